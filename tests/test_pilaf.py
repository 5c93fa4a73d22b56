"""The samplers: distributions on hand-made logits, forward counts (paper Table 1), Best-of-N ranking."""
import pytest
import torch
import torch.nn.functional as F

from conftest import EOS, H_POL, H_REF, N_PROMPTS as N, PAD, PROMPTS, CountingLM, left_padded, one_token_pairs, tiny_lm
from dpo import sequence_logps
from pilaf import SAMPLERS, best_of_n
from sample import generate, mix

def assert_follows(tokens, logits):
    p = F.softmax(torch.tensor(logits, dtype=torch.float64), -1)
    n = len(tokens)
    assert n > 1000
    freq = torch.bincount(tokens, minlength=len(p)).double() / n
    assert ((freq - p).abs() <= 4 * (p * (1 - p) / n).sqrt() + 1e-12).all(), (freq, p)

def test_pilaf_pairs_follow_pi_plus_and_pi_minus():
    beta = 1.0   # large, so pi+ = softmax(2 h - h_ref) and pi- = softmax(h_ref) differ clearly from pi
    out = one_token_pairs("pilaf", H_POL, H_REF, beta)
    mixed = torch.tensor([s == ("pi+", "pi-") for s in out["src"]])
    assert all(s in [("pi+", "pi-"), ("pi", "pi")] for s in out["src"])
    assert abs(mixed.float().mean() - 0.5) < 4 * (0.25 / N) ** 0.5          # a fair coin per prompt
    hp, hr = torch.tensor(H_POL), torch.tensor(H_REF)
    assert_follows(out["a"][mixed, 0], ((1 + beta) * hp - beta * hr).tolist())
    assert_follows(out["b"][mixed, 0], ((1 - beta) * hp + beta * hr).tolist())
    assert_follows(out["a"][~mixed, 0], H_POL)
    assert_follows(out["b"][~mixed, 0], H_POL)
    assert out["forwards"] == 4 * int(mixed.sum()) + 2 * int((~mixed).sum())

def test_pilaf_is_vanilla_when_policy_is_reference():
    """At initialisation pi+ = pi- = pi (paper Sec. 4), exactly, so PILAF starts as Vanilla."""
    h = torch.tensor([H_POL])
    torch.testing.assert_close(mix([h, h], (1.1, -0.1)), F.log_softmax(h, -1))
    torch.testing.assert_close(mix([h, h], (0.9, 0.1)), F.log_softmax(h, -1))
    out = one_token_pairs("pilaf", H_POL, H_POL, 0.1)
    assert_follows(out["a"][:, 0], H_POL)
    assert_follows(out["b"][:, 0], H_POL)

def test_hybrid_second_response_is_the_reference():
    out = one_token_pairs("hybrid", H_POL, H_REF, 0.1)
    assert_follows(out["a"][:, 0], H_POL)
    assert_follows(out["b"][:, 0], H_REF)
    assert out["src"][0] == ("pi", "pi_ref")

@pytest.mark.parametrize("name,fwd,score", [("vanilla", 2, 0), ("hybrid", 2, 0), ("best_of_n", 8, 16)])
def test_forward_counts_match_table_1(name, fwd, score):
    out = one_token_pairs(name, H_POL, H_REF, 0.1)
    assert out["forwards"] == fwd * N and out["score_forwards"] == score * N

def test_pilaf_spends_3_forwards_per_pair_on_average():
    out = one_token_pairs("pilaf", H_POL, H_REF, 0.1, seed=1)
    assert abs(out["forwards"] / N - 3) < 4 * (1 / N) ** 0.5   # 2 or 4 with equal odds: sd 1 per pair

def test_best_of_n_picks_highest_and_lowest_implicit_reward():
    pol, ref, beta, n = tiny_lm(1), tiny_lm(2), 0.5, 6
    ids_p, mask_p = left_padded(PROMPTS)
    gen = dict(max_new_tokens=8, eos_id=EOS, pad_id=PAD, temperature=1.0)
    out = best_of_n(pol, ref, ids_p, mask_p, beta, dict(gen, generator=torch.Generator().manual_seed(7)), n=n)
    # brute force: the same candidates (same generator), each scored alone, unpadded
    cand, cmask, _ = generate([pol], (1.0,), ids_p.repeat_interleave(n, 0), mask_p.repeat_interleave(n, 0),
                              generator=torch.Generator().manual_seed(7), **gen)
    for i, p in enumerate(PROMPTS):
        rs = []
        for j in range(i * n, (i + 1) * n):
            r = cand[j, : int(cmask[j].sum())][None]
            args = (torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long), r, torch.ones_like(r))
            rs.append((beta * (sequence_logps(pol, *args) - sequence_logps(ref, *args))).item())
        def reward_of(x, m):
            hits = [k for k in range(n) if cand[i * n + k, : int(cmask[i * n + k].sum())].tolist() == x[: int(m.sum())].tolist()]
            return rs[hits[0]]
        assert abs(reward_of(out["a"][i], out["a_mask"][i]) - max(rs)) < 1e-9
        assert abs(reward_of(out["b"][i], out["b_mask"][i]) - min(rs)) < 1e-9

def test_best_of_n_ties_give_two_different_candidates():
    """policy == reference: every implicit reward is 0, yet top and bottom are distinct candidates."""
    pol, n = tiny_lm(1), 4
    ids_p, mask_p = left_padded(PROMPTS * 4)
    gen = dict(max_new_tokens=8, eos_id=EOS, pad_id=PAD, temperature=1.0)
    out = best_of_n(pol, pol, ids_p, mask_p, 0.1, dict(gen, generator=torch.Generator().manual_seed(9)), n=n)
    g = torch.Generator().manual_seed(9)
    cand, cmask, _ = generate([pol], (1.0,), ids_p.repeat_interleave(n, 0), mask_p.repeat_interleave(n, 0), generator=g, **gen)
    perm = torch.argsort(torch.rand(len(ids_p), n, generator=g), 1)   # the sampler's tie-breaking draw
    hi, lo = perm[:, -1], perm[:, 0]
    assert (hi != lo).all()
    for i in range(len(ids_p)):
        assert torch.equal(out["a"][i], cand[i * n + hi[i]]) and torch.equal(out["b"][i], cand[i * n + lo[i]])

@pytest.mark.parametrize("name", ["vanilla", "pilaf", "hybrid"])
def test_logged_forwards_are_the_rows_each_model_reads(name):
    """One decode loop per batch; every step, each model reads only the rows that use it. So the rows
    read, over the whole loop, are `forwards` times the steps: PILAF's reference only on pi+- rows."""
    pol, ref = CountingLM(tiny_lm(1)), CountingLM(tiny_lm(2))
    ids_p, mask_p = left_padded(PROMPTS * 4)
    gen = dict(max_new_tokens=6, eos_id=99, pad_id=PAD, temperature=1.0, generator=torch.Generator().manual_seed(2))
    out = SAMPLERS[name](pol, ref, ids_p, mask_p, 0.1, gen)       # no EOS in a 12-token vocabulary: all 6 steps
    assert out["a"].shape[1] == 6 and pol.rows + ref.rows == 6 * out["forwards"]
    if name == "pilaf":
        assert ref.rows == 6 * 2 * sum(s == ("pi+", "pi-") for s in out["src"])   # pi+ and pi- rows only
        assert 0 < ref.rows < pol.rows

def test_samplers_return_the_log_probs_they_drew_with():
    """Vanilla rows score as the policy, hybrid's b rows as the reference, pi+ rows as the pi+ mix."""
    pol, ref = tiny_lm(1), tiny_lm(2)
    ids_p, mask_p = left_padded(PROMPTS * 2)
    gen = dict(max_new_tokens=8, eos_id=EOS, pad_id=PAD, temperature=1.0, generator=torch.Generator().manual_seed(3))
    h = SAMPLERS["hybrid"](pol, ref, ids_p, mask_p, 0.1, gen)
    torch.testing.assert_close(h["a_logps"].sum(-1), sequence_logps(pol, ids_p, mask_p, h["a"], h["a_mask"]), rtol=0, atol=1e-10)
    torch.testing.assert_close(h["b_logps"].sum(-1), sequence_logps(ref, ids_p, mask_p, h["b"], h["b_mask"]), rtol=0, atol=1e-10)
    p = SAMPLERS["pilaf"](pol, ref, ids_p, mask_p, 0.5, gen)
    for i, (sa, _) in enumerate(p["src"]):
        n = int(p["a_mask"][i].sum())
        x = torch.cat([ids_p[i][mask_p[i].bool()], p["a"][i, :n]])[None]
        P = int(mask_p[i].sum())
        hp, hr = pol(x).logits[0, P - 1:-1], ref(x).logits[0, P - 1:-1]     # (n, V) each, unpadded
        coefs = (1.5, -0.5) if sa == "pi+" else (1.0, 0.0)
        want = mix([hp, hr], coefs).gather(-1, p["a"][i, :n, None]).squeeze(-1)
        torch.testing.assert_close(p["a_logps"][i, :n], want, rtol=0, atol=1e-10)
