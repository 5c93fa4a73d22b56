"""
DPO (Rafailov et al. 2023), the loss every sampler in this repo trains with:

    loss = -log sigmoid( beta*log(pi(y_w)/pi_ref(y_w)) - beta*log(pi(y_l)/pi_ref(y_l)) )

beta*log(pi/pi_ref) is the implicit reward r_theta; PILAF's pi+/pi- are pi*exp(+-r_theta) renormalised
token by token (paper Sec. 4), and Best-of-N ranks its candidates by it.

PILAF chooses which pairs get labelled; the loss is a separate axis. With the margin of the log-ratios
D = log(pi(y_w)/pi_ref(y_w)) - log(pi(y_l)/pi_ref(y_l)), `loss` picks one of the DPO family:
    dpo     -log sigmoid(beta * D)
    ipo     (D - 1/(2 beta))^2          (Azar et al. 2023: regresses the margin to a finite target)
    hinge   max(0, 1 - beta * D)        (SLiC-style: no push once the margin clears 1/beta)
The implicit rewards, accuracy and margin mean the same under all three.
"""
import torch
import torch.nn.functional as F

import ddp
from sample import positions

def response_logits(model, prompt_ids, prompt_mask, resp_ids, resp_mask):
    """Logits predicting each response token, teacher-forced in one forward pass. -> (B, L, V), at least float32

    prompt_ids/mask: (B, P) left-padded; resp_ids/mask: (B, L) right-padded (EOS counted, padding not).
    Positions come from the attention mask by sample.positions, as in sampling, so the numbers match.
    """
    ids = torch.cat([prompt_ids, resp_ids], dim=1)                 # (B, P+L)
    attn = torch.cat([prompt_mask, resp_mask], dim=1).long()       # (B, P+L)
    L = resp_ids.shape[1]
    # Only the last L+1 positions reach the LM head (the prompt's last token predicts the first
    # response token; the final position predicts nothing): at a 50k vocabulary the prompt's logits
    # would be most of the step's memory, and no token of the prompt is scored.
    # no KV cache: nothing follows this forward (and a recomputed block, --activation_checkpointing, would
    # append its keys to the cache a second time)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=positions(attn), logits_to_keep=L + 1,
                   use_cache=False).logits[:, :-1]  # (B, L, V)
    return logits.to(torch.promote_types(logits.dtype, torch.float32))

def sequence_logps(model, prompt_ids, prompt_mask, resp_ids, resp_mask):
    """Summed log-prob of each response given its prompt (shapes as in response_logits). -> (B,)"""
    logits = response_logits(model, prompt_ids, prompt_mask, resp_ids, resp_mask)          # (B, L, V)
    # log softmax at the response tokens only: gathered logit - logsumexp, no second (B, L, V) tensor
    lp = logits.gather(2, resp_ids[:, :, None]).squeeze(-1) - logits.logsumexp(-1)   # (B, L)
    return (lp * resp_mask).sum(-1)

def log_ratio(policy, ref, prompt_ids, prompt_mask, resp_ids, resp_mask):
    """log pi(y|x) - log pi_ref(y|x) of whole responses (B,): beta times it is the implicit reward,
    its mean over policy samples the sequence KL."""
    return (sequence_logps(policy, prompt_ids, prompt_mask, resp_ids, resp_mask)
            - sequence_logps(ref, prompt_ids, prompt_mask, resp_ids, resp_mask))

@torch.no_grad()
def kl_estimates(policy, ref, prompt_ids, prompt_mask, resp_ids, resp_mask, chunk=32):
    """Two estimates of KL(pi || pi_ref) from responses y sampled from pi, one value per response:

        exact    sum_t KL(pi(.|x, y<t) || pi_ref(.|x, y<t)), summed over the vocabulary at every prefix y visited
        sampled  log pi(y|x) - log pi_ref(y|x)

    Both have the sequence KL as their expectation (the exact one is the sampled one with each token's
    draw averaged out, given the prefix). The exact one usually has the lower variance, not always: a
    token's draw also decides the prefixes after it, and that covariance can go either way. -> (B,), (B,)
    A chunk of rows at a time: (chunk, L, V) log-probs of two models at once, not (B, L, V). Under --fsdp
    every rank makes as many chunks as the rank with the most (ddp.most), a spare one on its last row."""
    exact, sampled = [], []
    for k in range(ddp.most(-(-len(resp_ids) // chunk))):
        i = k * chunk
        rows = [t[i:i + chunk] if i < len(resp_ids) else t[-1:] for t in (prompt_ids, prompt_mask, resp_ids, resp_mask)]
        lp = torch.log_softmax(response_logits(policy, *rows), -1)                       # (b, L, V)
        d = lp - torch.log_softmax(response_logits(ref, *rows), -1)                      # log pi - log pi_ref
        if i >= len(resp_ids):
            continue                                                                     # a spare chunk: nothing kept
        m = rows[3]
        exact.append(((lp.exp() * d).sum(-1) * m).sum(-1))
        sampled.append((d.gather(2, rows[2][:, :, None]).squeeze(-1) * m).sum(-1))
    return torch.cat(exact), torch.cat(sampled)

def pair_logps(model, prompt_ids, prompt_mask, chosen, chosen_mask, rejected, rejected_mask):
    """Log-probs of chosen and rejected responses to the same prompts. -> (B,), (B,)

    Two forwards rather than one over the 2B rows stacked: each (B, L, V) block of logits and its
    logsumexp exists for half the rows at a time, and neither response is padded to the other's length
    (bench.py (d) measures the peak memory and time of both: docs/performance.md)."""
    return (sequence_logps(model, prompt_ids, prompt_mask, chosen, chosen_mask),
            sequence_logps(model, prompt_ids, prompt_mask, rejected, rejected_mask))

LOSSES = ("dpo", "ipo", "hinge")

def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta, loss="dpo"):
    """Per-example losses (B,) (DPO's, or IPO's or the hinge's, see above), and the implicit rewards
    of chosen and rejected (B,), detached."""
    chosen_r = beta * (pi_chosen - ref_chosen)
    rejected_r = beta * (pi_rejected - ref_rejected)
    if loss == "dpo":
        losses = -F.logsigmoid(chosen_r - rejected_r)
    elif loss == "ipo":
        margin = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)     # D, without beta
        losses = (margin - 1 / (2 * beta)) ** 2
    elif loss == "hinge":
        losses = F.relu(1 - (chosen_r - rejected_r))
    else:
        raise ValueError(f"unknown loss '{loss}' (use one of {', '.join(LOSSES)})")
    return losses, chosen_r.detach(), rejected_r.detach()

def reward_metrics(chosen_r, rejected_r):
    """Implicit-reward accuracy (chosen scored above rejected), mean margin, and mean gap |Delta_theta|
    (how far apart the pair's implicit rewards are, whichever was chosen)."""
    d = chosen_r - rejected_r
    return dict(acc=(d > 0).float().mean().item(), margin=d.mean().item(), gap=d.abs().mean().item())
