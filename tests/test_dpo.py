"""DPO loss and sequence log-probs, against hand-computed values and token-by-token references."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import EOS, PAD, PROMPTS, left_padded, tiny_lm
from dpo import dpo_loss, kl_estimates, pair_logps, reward_metrics, sequence_logps
from sample import generate

def test_loss_is_log2_when_policy_is_reference():
    lp = torch.tensor([-3.0, -7.5, -0.2])
    losses, cr, rr = dpo_loss(lp, lp + 1, lp, lp + 1, beta=0.1)
    torch.testing.assert_close(losses, torch.full((3,), math.log(2)))
    assert (cr == 0).all() and (rr == 0).all()

def test_loss_hand_computed():
    # beta = 0.5: chosen reward 0.5*(-1 - -2) = 0.5, rejected 0.5*(-3 - -2) = -0.5, margin 1
    losses, cr, rr = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), 0.5)
    assert abs(losses.item() - math.log(1 + math.exp(-1))) < 1e-6      # -log sigmoid(1) = 0.31326
    assert cr.item() == 0.5 and rr.item() == -0.5
    assert reward_metrics(cr, rr) == dict(acc=1.0, margin=1.0, gap=1.0)

def test_accuracy_counts_the_pairs_ranked_right_and_a_tie_as_wrong():
    """Implicit-reward accuracy: chosen strictly above rejected. A tie (the policy cannot tell the two
    apart, as at the reference) is not a pair ranked right. The gap is |margin|, whichever side won."""
    m = reward_metrics(torch.tensor([0.5, 0.0, -1.0, 2.0]), torch.tensor([0.1, 0.0, 0.0, 2.0]))
    assert m == dict(acc=0.25, margin=pytest.approx((0.4 + 0 - 1 + 0) / 4), gap=pytest.approx((0.4 + 0 + 1 + 0) / 4))

def test_rewards_are_detached_and_loss_has_the_dpo_gradient():
    pc = torch.tensor([-1.0], requires_grad=True)
    losses, cr, _ = dpo_loss(pc, torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), 0.5)
    assert not cr.requires_grad
    losses.sum().backward()
    # d/d pc of -log sigmoid(beta*(pc - ...)) = -beta * sigmoid(-margin) with margin 1
    assert abs(pc.grad.item() - (-0.5 / (1 + math.e))) < 1e-6

def test_sequence_logps_match_token_by_token_and_sampling():
    """Scoring left-padded prompts with right-padded responses gives, for every row, the sum of
    per-token log-probs computed on the unpadded sequence alone, and the log-probs the sampler
    drew the tokens with (same positions)."""
    model = tiny_lm(5)
    ids_p, mask_p = left_padded(PROMPTS)
    ids, mask, samp = generate([model], (1.0,), ids_p, mask_p, 10, EOS, PAD, 1.0, torch.Generator().manual_seed(3))
    got = sequence_logps(model, ids_p, mask_p, ids, mask)
    torch.testing.assert_close(got, samp.sum(-1), rtol=0, atol=1e-10)
    for i, p in enumerate(PROMPTS):
        r = ids[i, : int(mask[i].sum())].tolist()
        logits = model(torch.tensor([p + r])).logits[0]
        want = sum(F.log_softmax(logits[len(p) - 1 + t], -1)[tok] for t, tok in enumerate(r))
        torch.testing.assert_close(got[i], want, rtol=0, atol=1e-10)

def test_pair_logps_scores_chosen_and_rejected():
    model = tiny_lm(6)
    ids_p, mask_p = left_padded(PROMPTS)
    g = torch.Generator().manual_seed(4)
    a, am, _ = generate([model], (1.0,), ids_p, mask_p, 6, EOS, PAD, 1.0, g)
    b, bm, _ = generate([model], (1.0,), ids_p, mask_p, 9, EOS, PAD, 1.0, g)
    pc, pr = pair_logps(model, ids_p, mask_p, a, am, b, bm)
    torch.testing.assert_close(pc, sequence_logps(model, ids_p, mask_p, a, am), rtol=0, atol=1e-10)
    torch.testing.assert_close(pr, sequence_logps(model, ids_p, mask_p, b, bm), rtol=0, atol=1e-10)

def full_logits_logps(model, prompt_ids, prompt_mask, resp_ids, resp_mask):
    """The direct computation: logits at every position, a log_softmax over all of them, gather."""
    ids, attn = torch.cat([prompt_ids, resp_ids], 1), torch.cat([prompt_mask, resp_mask], 1)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0)).logits
    lp = F.log_softmax(logits, -1)[:, prompt_ids.shape[1] - 1:-1].gather(2, resp_ids[:, :, None]).squeeze(-1)
    return (lp * resp_mask).sum(-1)

def test_response_only_logits_equal_full_logits_in_value_and_gradient():
    model = tiny_lm(7)
    ids_p, mask_p = left_padded(PROMPTS)
    ids, mask, _ = generate([model], (1.0,), ids_p, mask_p, 9, EOS, PAD, 1.0, torch.Generator().manual_seed(5))
    got, want = sequence_logps(model, ids_p, mask_p, ids, mask), full_logits_logps(model, ids_p, mask_p, ids, mask)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    g1 = torch.autograd.grad(got.sum(), list(model.parameters()))
    g2 = torch.autograd.grad(want.sum(), list(model.parameters()))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)

def test_ipo_and_hinge_losses_hand_computed():
    """D = log-ratio margin = (-1 - -2) - (-3 - -2) = 2. IPO: (D - 1/(2 beta))^2; hinge: max(0, 1 - beta*D).
    The implicit rewards are the same as DPO's whatever the loss."""
    args = torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0])
    for beta, ipo, hinge in ((0.5, (2 - 1) ** 2, 0.0), (0.1, (2 - 5) ** 2, 1 - 0.2), (0.25, 0.0, 0.5)):
        got_ipo, cr, rr = dpo_loss(*args, beta, "ipo")
        got_hinge, cr2, rr2 = dpo_loss(*args, beta, "hinge")
        assert abs(got_ipo.item() - ipo) < 1e-6 and abs(got_hinge.item() - hinge) < 1e-6, beta
        assert abs(cr.item() - beta) < 1e-6 and abs(rr.item() + beta) < 1e-6 and (cr, rr) == (cr2, rr2)

def test_ipo_and_hinge_gradients():
    pc = torch.tensor([-1.0], requires_grad=True)
    dpo_loss(pc, torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), 0.1, "ipo")[0].sum().backward()
    assert abs(pc.grad.item() - 2 * (2 - 5)) < 1e-5          # d/dpc (D - 5)^2 = 2 (D - 5)
    pc.grad = None
    dpo_loss(pc, torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), 0.1, "hinge")[0].sum().backward()
    assert abs(pc.grad.item() - -0.1) < 1e-6                 # inside the hinge: d/dpc (1 - beta D) = -beta

def test_exact_kl_is_the_per_token_sum_over_the_vocabulary():
    """kl_estimates against the definition, row by row on the unpadded sequence: at every prefix the
    response visited, sum_v pi(v) (log pi(v) - log pi_ref(v)); and the sampled log-ratio."""
    pol, ref = tiny_lm(8), tiny_lm(9)
    ids_p, mask_p = left_padded(PROMPTS)
    ids, mask, _ = generate([pol], (1.0,), ids_p, mask_p, 7, EOS, PAD, 1.0, torch.Generator().manual_seed(6))
    exact, sampled = kl_estimates(pol, ref, ids_p, mask_p, ids, mask, chunk=3)   # chunks of rows give the same
    for i, p in enumerate(PROMPTS):
        r = ids[i, : int(mask[i].sum())].tolist()
        lp, lq = (F.log_softmax(m(torch.tensor([p + r])).logits[0, len(p) - 1:-1], -1) for m in (pol, ref))  # (len r, V)
        torch.testing.assert_close(exact[i], (lp.exp() * (lp - lq)).sum(), rtol=0, atol=1e-10)
        torch.testing.assert_close(sampled[i], (lp - lq)[range(len(r)), r].sum(), rtol=0, atol=1e-10)

def test_exact_and_sampled_kl_agree_in_expectation_and_exact_varies_less():
    """Both estimate the same sequence KL: over 2000 responses their paired difference is within 4
    standard errors of 0, and the exact one's variance is the smaller (fixed seeds)."""
    pol, ref = tiny_lm(8), tiny_lm(9)
    with torch.no_grad():
        pol.lm_head.weight.mul_(5)                  # sharper than the reference: a KL near 1 nat
    ids_p, mask_p = left_padded(PROMPTS * 500)
    ids, mask, _ = generate([pol], (1.0,), ids_p, mask_p, 6, EOS, PAD, 1.0, torch.Generator().manual_seed(7))
    exact, sampled = kl_estimates(pol, ref, ids_p, mask_p, ids, mask)
    d = sampled - exact
    assert abs(d.mean()) < 4 * d.std() / len(d) ** 0.5, (exact.mean(), sampled.mean())
    assert exact.mean() > 0.5                       # the two models differ: a KL well away from 0
    assert exact.var() < 0.5 * sampled.var(), (exact.var(), sampled.var())

def test_activation_checkpointing_keeps_less_and_recomputes_each_block_to_the_same_gradient(monkeypatch):
    """--activation_checkpointing (ddp.recompute): the step's graph keeps fewer bytes, every block runs once more in
    backward, and the loss and the gradient are the same numbers. A deepcopy (--reference behavior) runs its own weights."""
    import copy

    import ddp
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block
    ids_p, mask_p = left_padded(PROMPTS)
    c, cm, _ = generate([tiny_lm(8)], (1.0,), ids_p, mask_p, 9, EOS, PAD, 1.0, torch.Generator().manual_seed(6))
    calls, forward = [0], GPT2Block.forward
    monkeypatch.setattr(GPT2Block, "forward", lambda *a, **k: (calls.__setitem__(0, calls[0] + 1), forward(*a, **k))[1])

    def step(model):
        calls[0], kept = 0, []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: (kept.append(t.numel() * t.element_size()), t)[1], lambda t: t):
            lp = sequence_logps(model, ids_p, mask_p, c, cm)
        forwards = calls[0]
        grads = torch.autograd.grad(lp.sum(), list(model.parameters()))
        return lp, grads, sum(kept), forwards, calls[0] - forwards

    plain, ckpt = tiny_lm(9), ddp.recompute(tiny_lm(9))
    lp0, g0, kept0, f0, b0 = step(plain)
    lp1, g1, kept1, f1, b1 = step(ckpt)
    assert (f0, b0) == (2, 0) and (f1, b1) == (2, 2)      # 2 blocks: each forward once, and again in backward
    assert kept1 < 0.6 * kept0, (kept1, kept0)
    assert torch.equal(lp0, lp1) and all(torch.equal(a, b) for a, b in zip(g0, g1))
    twin = copy.deepcopy(ckpt)
    with torch.no_grad():
        for p in ckpt.parameters():
            p.add_(1.0)
    assert torch.equal(sequence_logps(twin, ids_p, mask_p, c, cm), lp0)
