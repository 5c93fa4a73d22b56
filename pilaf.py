"""
The samplers: how each method turns a batch of prompts into the pairs of responses that get
labelled. This choice is the whole difference between the methods; labelling (oracle.py) and the
DPO update (dpo.py) are the same for all of them.

    vanilla    both responses from the policy pi
    pilaf      per prompt, a fair coin: (pi+, pi-) or (pi, pi)                     (paper Alg. 1)
    best_of_n  N policy samples; the highest and lowest implicit reward are the pair
    hybrid     one from the policy, one from the reference (XPO's sampling)

Why PILAF's pair (paper Sec. 4): vanilla pairs make the DPO gradient weight each pair by
sigmoid'(Delta_theta), which down-weights exactly the pairs whose implicit rewards differ most, so
it does not follow the gradient of J = E[r] - beta*KL. Drawing pairs from pi x pi / sigmoid'(Delta)
removes that weight; as 1/sigmoid'(D) = 2 + e^D + e^-D that is a mixture of (pi, pi) pairs and
(pi+, pi-) pairs with pi+- ∝ pi*exp(+-r_theta) = pi^(1+-beta) * pi_ref^(-+beta) (r_theta =
beta*log(pi/pi_ref)). PILAF gives each half of the mixture probability 1/2.

Every sampler has the same signature and returns a dict:
    a, a_mask, b, b_mask  (B, L) response ids and masks, right-padded
    src                   [(source of a, source of b)] per prompt, e.g. ("pi+", "pi-")
    forwards              sampling cost: for each response, the number of models stepped to decode it
    score_forwards        extra teacher-forced passes (Best-of-N's ranking)
Table 1 of the paper, sampling forwards per labelled pair: vanilla 2, best_of_n 8 (N=8), hybrid 2,
pilaf 3 on average (a pi+- response steps both models: 4 for half the pairs, 2 for the other half).
"""
import torch

from dpo import log_ratio, pad_to
from sample import generate

def _rand(shape, g):
    """Uniform draws from the sampling generator (on its device, so CUDA generators work too)."""
    return torch.rand(shape, generator=g, device=g.device if g is not None else None).cpu()

def _rows(B, parts, pad_id):
    """Scatter sub-batches [(row index (n,), ids (n, L_i), mask (n, L_i))] into one (B, max L_i) batch."""
    L = max(ids.shape[1] for _, ids, _ in parts)
    ids = torch.full((B, L), pad_id, dtype=torch.long, device=parts[0][1].device)
    mask = torch.zeros((B, L), dtype=torch.long, device=ids.device)
    for rows, i, m in parts:
        ids[rows], mask[rows] = pad_to(i, L, pad_id), pad_to(m, L, 0)
    return ids, mask

def _twice(models, coefs, prompt_ids, prompt_mask, gen):
    """Two independent responses per prompt from the same mix, in one decode. -> (ids, mask) x 2"""
    ids, mask, _ = generate(models, coefs, prompt_ids.repeat(2, 1), prompt_mask.repeat(2, 1), **gen)
    B = prompt_ids.shape[0]
    return (ids[:B], mask[:B]), (ids[B:], mask[B:])

def _out(a, b, src, forwards, score_forwards=0):
    return dict(a=a[0], a_mask=a[1], b=b[0], b_mask=b[1], src=src, forwards=forwards, score_forwards=score_forwards)

def vanilla(policy, ref, prompt_ids, prompt_mask, beta, gen):
    B = prompt_ids.shape[0]
    a, b = _twice([policy], [1.0], prompt_ids, prompt_mask, gen)
    return _out(a, b, [("pi", "pi")] * B, 2 * B)

def pilaf(policy, ref, prompt_ids, prompt_mask, beta, gen):
    B = prompt_ids.shape[0]
    coin = _rand(B, gen.get("generator")) < 0.5       # (B,) True: a (pi+, pi-) pair
    mixed, plain = coin.nonzero().squeeze(-1), (~coin).nonzero().squeeze(-1)
    a_parts, b_parts = [], []
    if len(mixed):
        for coefs, parts in (((1 + beta, -beta), a_parts), ((1 - beta, beta), b_parts)):
            ids, mask, _ = generate([policy, ref], coefs, prompt_ids[mixed], prompt_mask[mixed], **gen)
            parts.append((mixed.to(ids.device), ids, mask))
    if len(plain):
        a, b = _twice([policy], [1.0], prompt_ids[plain], prompt_mask[plain], gen)
        a_parts.append((plain.to(a[0].device), *a))
        b_parts.append((plain.to(b[0].device), *b))
    src = [("pi+", "pi-") if c else ("pi", "pi") for c in coin.tolist()]
    pad = gen["pad_id"]
    return _out(_rows(B, a_parts, pad), _rows(B, b_parts, pad), src, 4 * len(mixed) + 2 * len(plain))

def hybrid(policy, ref, prompt_ids, prompt_mask, beta, gen):
    B = prompt_ids.shape[0]
    a, b = (generate([m], [1.0], prompt_ids, prompt_mask, **gen)[:2] for m in (policy, ref))
    return _out(a, b, [("pi", "pi_ref")] * B, 2 * B)

def best_of_n(policy, ref, prompt_ids, prompt_mask, beta, gen, n=8):
    """N policy samples per prompt, ranked by beta*log(pi/pi_ref) of the whole response
    (teacher-forced through both models); the top and bottom one are the pair. The oracle only ever
    sees those two, so the annotation cost stays 2 per pair (paper Table 1)."""
    B = prompt_ids.shape[0]
    p_ids, p_mask = prompt_ids.repeat_interleave(n, 0), prompt_mask.repeat_interleave(n, 0)  # (B*n, P)
    ids, mask, _ = generate([policy], [1.0], p_ids, p_mask, **gen)                            # (B*n, L)
    with torch.no_grad():
        r = beta * log_ratio(policy, ref, p_ids, p_mask, ids, mask)
    # rank within each prompt; a random order first breaks ties, so that even when every reward is
    # equal (policy == reference) top and bottom are two different candidates
    perm = torch.argsort(_rand((B, n), gen.get("generator")), dim=1).to(r.device)   # (B, n)
    order = perm.gather(1, torch.sort(r.view(B, n).gather(1, perm), dim=1, stable=True).indices)
    base = torch.arange(B, device=r.device) * n
    hi, lo = base + order[:, -1], base + order[:, 0]
    return _out((ids[hi], mask[hi]), (ids[lo], mask[lo]), [("best", "worst")] * B, n * B, 2 * n * B)

SAMPLERS = {"vanilla": vanilla, "pilaf": pilaf, "best_of_n": best_of_n, "hybrid": hybrid}
