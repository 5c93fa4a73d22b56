"""
The samplers: how each method turns a batch of prompts into the pairs of responses that get
labelled. This choice is the whole difference between the methods; labelling (oracle.py) and the
DPO update (dpo.py) are the same for all of them.

    vanilla    both responses from the policy pi
    pilaf      per prompt, a fair coin: (pi+, pi-) or (pi, pi)                     (paper Alg. 1)
    best_of_n  N policy samples; the highest and lowest implicit reward are the pair
    hybrid     one from the policy, one from the reference (XPO's sampling)
    t_pilaf    the theory's sampler: sequence-level pi+- and the exact mixture weight, by resampling
               N policy samples (paper Sec. 5)

Why PILAF's pair (paper Sec. 4): vanilla pairs make the DPO gradient weight each pair by
sigmoid'(Delta_theta), which down-weights exactly the pairs whose implicit rewards differ most, so
it does not follow the gradient of J = E[r] - beta*KL. Drawing pairs from pi x pi / sigmoid'(Delta)
removes that weight; as 1/sigmoid'(D) = 2 + e^D + e^-D that is a mixture of (pi, pi) pairs and
(pi+, pi-) pairs with pi+- ∝ pi*exp(+-r_theta) = pi^(1+-beta) * pi_ref^(-+beta) (r_theta =
beta*log(pi/pi_ref)). PILAF gives each half of the mixture probability 1/2.

What is sampled here is the paper's Sec. 4 realisation: pi+- mixed token by token (sample.generate),
renormalised at every prefix. That is not the sequence-level pi*exp(+-r_theta) normalised over whole
responses, which the argument above uses; it is close but not the same (notebook 02 enumerates every
two-word reply and measures the gap against the tilt itself).

Every sampler has the same signature and returns a dict:
    a, a_mask, b, b_mask  (B, L) response ids and masks, right-padded
    a_logps, b_logps      (B, L) each token's log-prob under the distribution it was drawn from
                          (for forks: importance weights)
    src                   [(source of a, source of b)] per prompt, e.g. ("pi+", "pi-")
    extra                 (optional) a dict per prompt that pairs.jsonl keeps with the pair (t_pilaf's Z+-)
    forwards              (optional, 0 if left out) sampling cost: for each response, the number of
                          models stepped to decode it
    score_forwards        (optional, 0 if left out) extra teacher-forced passes (Best-of-N's ranking)
Table 1 of the paper, sampling forwards per labelled pair: vanilla 2, best_of_n 8 (N=8), hybrid 2,
pilaf 3 on average (a pi+- response steps both models: 4 for half the pairs, 2 for the other half).
Each sampler makes its whole batch in one decode loop (sample.generate with a mix per row), so it
pays one loop's overhead, not one per distinct mix. Wall time follows those forward counts only where
a forward's cost follows its rows, which at the embedded world's size it does not (bench.py (b);
docs/performance.md).

A sampler with options of its own (best_of_n's --n) takes them as keyword parameters, named in OPTIONS
below and on train.py's command line (options.py's "sampler options" group), which passes each sampler
its own.
"""
import torch

from dpo import log_ratio
from sample import generate

def _rand(shape, g):
    """Uniform draws from the sampling generator (on its device, so CUDA generators work too)."""
    return torch.rand(shape, generator=g, device=g.device if g is not None else None).cpu()

def _pairs(models, weights, prompt_ids, prompt_mask, src, forwards, gen, order=None):
    """Decode a and b for every prompt in one loop: rows 0..B-1 are the a responses, rows B..2B-1 the
    b responses, row i mixing `models` with weights[i] (2B, M). `order` (2B,) is the order the rows are
    decoded in (their outputs come back in the a-then-b order)."""
    B = prompt_ids.shape[0]
    p_ids, p_mask = prompt_ids.repeat(2, 1), prompt_mask.repeat(2, 1)
    if order is None:
        ids, mask, logps = generate(models, weights, p_ids, p_mask, **gen)
    else:
        rows = order.to(p_ids.device)
        out = generate(models, weights[order], p_ids[rows], p_mask[rows], **gen)
        ids, mask, logps = (torch.empty_like(t).index_copy_(0, rows, t) for t in out)   # back to a, then b
    return dict(a=ids[:B], a_mask=mask[:B], a_logps=logps[:B], b=ids[B:], b_mask=mask[B:], b_logps=logps[B:],
                src=src, forwards=forwards, score_forwards=0)

def vanilla(policy, ref, prompt_ids, prompt_mask, beta, gen):
    B = prompt_ids.shape[0]
    return _pairs([policy], (1.0,), prompt_ids, prompt_mask, [("pi", "pi")] * B, 2 * B, gen)

def pilaf(policy, ref, prompt_ids, prompt_mask, beta, gen):
    """Per prompt a fair coin: (pi+, pi-) or (pi, pi) (paper Alg. 1). The reference is stepped only on
    the pi+- rows: 4 forwards for a mixed pair, 2 for a plain one."""
    B = prompt_ids.shape[0]
    coin = (_rand(B, gen.get("generator")) < 0.5)[:, None]                         # (B, 1) True: a (pi+, pi-) pair
    plain = torch.tensor([1.0, 0.0], dtype=torch.float64)
    w_a = torch.where(coin, torch.tensor([1 + beta, -beta], dtype=torch.float64), plain)   # (B, 2) pi+ or pi
    w_b = torch.where(coin, torch.tensor([1 - beta, beta], dtype=torch.float64), plain)    # (B, 2) pi- or pi
    src = [("pi+", "pi-") if c else ("pi", "pi") for c in coin[:, 0].tolist()]
    n_mixed = int(coin.sum())
    # decoded with the pi+- rows first (their a rows, then their b rows), the plain rows after them: the
    # reference's rows are then one slice of the batch, read as views rather than gathered at every token
    mixed, plain_rows = coin[:, 0].nonzero()[:, 0], (~coin[:, 0]).nonzero()[:, 0]
    order = torch.cat([mixed, mixed + B, plain_rows, plain_rows + B])
    return _pairs([policy, ref], torch.cat([w_a, w_b]), prompt_ids, prompt_mask, src, 4 * n_mixed + 2 * (B - n_mixed),
                  gen, order)

def hybrid(policy, ref, prompt_ids, prompt_mask, beta, gen):
    """One response from the policy, one from the reference, in one loop (each model reads its B rows)."""
    B = prompt_ids.shape[0]
    w = torch.tensor([[1.0, 0.0]] * B + [[0.0, 1.0]] * B, dtype=torch.float64)   # (2B, 2): policy rows, then reference rows
    return _pairs([policy, ref], w, prompt_ids, prompt_mask, [("pi", "pi_ref")] * B, 2 * B, gen)

def _candidates(policy, ref, prompt_ids, prompt_mask, beta, gen, n):
    """n policy samples per prompt and their implicit rewards beta*log(pi/pi_ref) of the whole response,
    teacher-forced through both models: the candidates Best-of-N and T-PILAF choose from.
    -> ids, mask, logps (B*n, L), candidate j of prompt i in row i*n + j; r (B, n)"""
    B = prompt_ids.shape[0]
    p_ids, p_mask = prompt_ids.repeat_interleave(n, 0), prompt_mask.repeat_interleave(n, 0)  # (B*n, P)
    ids, mask, logps = generate([policy], [1.0], p_ids, p_mask, **gen)                        # (B*n, L)
    with torch.no_grad():
        r = beta * log_ratio(policy, ref, p_ids, p_mask, ids, mask).view(B, n)                # (B, n)
    return ids, mask, logps, r

def _chosen(ids, mask, logps, n, a, b):
    """The pair of each prompt out of its n candidates: indices a, b (B,) into them."""
    base = torch.arange(len(a), device=a.device) * n
    a, b = base + a, base + b
    return dict(a=ids[a], a_mask=mask[a], a_logps=logps[a], b=ids[b], b_mask=mask[b], b_logps=logps[b])

def best_of_n(policy, ref, prompt_ids, prompt_mask, beta, gen, n=8):
    """N policy samples per prompt, ranked by beta*log(pi/pi_ref) of the whole response
    (teacher-forced through both models); the top and bottom one are the pair. The oracle only ever
    sees those two, so the annotation cost stays 2 per pair (paper Table 1)."""
    B = prompt_ids.shape[0]
    ids, mask, logps, r = _candidates(policy, ref, prompt_ids, prompt_mask, beta, gen, n)
    # rank within each prompt; a random order first breaks ties, so that even when every reward is
    # equal (policy == reference) top and bottom are two different candidates
    perm = torch.argsort(_rand((B, n), gen.get("generator")), dim=1).to(r.device)   # (B, n)
    order = perm.gather(1, torch.sort(r.gather(1, perm), dim=1, stable=True).indices)
    return dict(_chosen(ids, mask, logps, n, order[:, -1], order[:, 0]), src=[("best", "worst")] * B,
                forwards=n * B, score_forwards=2 * n * B)

def resample(r, g):
    """T-PILAF's choice among N candidates per prompt, by sampling-importance-resampling.

    r (B, N): the candidates' implicit rewards r_theta, the candidates drawn from pi. The plain pair
    (a, b) is drawn first: one candidate of each half, uniformly. Z+- = E_pi[e^{+-r}] are estimated from
    the other N - 2 candidates, so the branch taken never depends on the plain pair's own candidates,
    and a plain pair is exactly a (pi, pi) pair. With probability Z+Z-/(1+Z+Z-) the prompt's pair is
    tilted instead: y+ resampled from the first N/2 candidates with weights e^{+r}, y- from the other
    N/2 with weights e^{-r} (self-normalised, so the tilt falls short of pi+- by O(1/N)). Drawing the two
    from different halves makes them different candidates and independent draws, as the pair
    distributions pi+ x pi- and pi x pi are products.
    -> dict of (B,) tensors: z_plus, z_minus, tilted (bool), plus and minus (the resampled y+ and y-,
    whichever branch is taken), a and b (the pair's two candidates); indices into the N."""
    B, N = r.shape
    h = N // 2
    u = _rand((B, 2), g).to(r.device)                                                # the plain pair: uniform picks
    a, b = (u[:, 0] * h).long().clamp(max=h - 1), h + (u[:, 1] * (N - h)).long().clamp(max=N - h - 1)
    others = torch.ones_like(r).scatter_(1, a[:, None], 0).scatter_(1, b[:, None], 0)  # (B, N) 1 but at a and b
    zp, zm = (r.exp() * others).sum(1) / (N - 2), ((-r).exp() * others).sum(1) / (N - 2)   # (B,)
    tilted = _rand(B, g).to(r.device) < zp * zm / (1 + zp * zm)                      # (B,)
    plus = torch.multinomial(torch.softmax(r[:, :h], 1), 1, generator=g)[:, 0]       # weights e^{+r}, normalised
    minus = h + torch.multinomial(torch.softmax(-r[:, h:], 1), 1, generator=g)[:, 0]  # weights e^{-r}
    return dict(z_plus=zp, z_minus=zm, tilted=tilted, plus=plus, minus=minus,
                a=torch.where(tilted, plus, a), b=torch.where(tilted, minus, b))

def t_pilaf(policy, ref, prompt_ids, prompt_mask, beta, gen, n=8, prompt_weight=False):
    """The theory's sampler (paper Sec. 5), which PILAF rounds twice: pairs from pi x pi / sigma'(Delta),
    i.e. (pi, pi) with probability 1/(1 + Z+Z-) and (pi+, pi-) otherwise, with pi+- = pi*e^{+-r_theta}/Z+-
    over whole responses (PILAF: token by token, and probability 1/2). Made practical by resampling
    (`resample`) N policy samples per prompt, their implicit rewards teacher-forced through both models
    as best_of_n does. The cost is Best-of-N's: N sampling forwards per prompt and 2N scoring passes,
    2 responses labelled. a_logps / b_logps are under pi, which drew the candidates (the resampled
    distribution itself has no tractable density). `extra` holds each pair's Z+, Z- and branch.

    With one pair per prompt, drawn uniformly, the expected DPO update of these pairs is
    sum_x grad J_x / C(x), C(x) = 2 + 2*Z+Z-(x) (notebook 01): prompts whose responses spread most count
    least. prompt_weight=True gives each pair the loss weight C(x) / (its batch's mean C), in `extra`
    (train.update multiplies the pair's loss by it), so that the expected update follows grad J itself."""
    B = prompt_ids.shape[0]
    ids, mask, logps, r = _candidates(policy, ref, prompt_ids, prompt_mask, beta, gen, n)
    got = resample(r.double(), gen.get("generator"))
    tilted = got["tilted"].tolist()
    C = 2 + 2 * got["z_plus"] * got["z_minus"]                                         # (B,)
    weights = (C / C.mean()).tolist() if prompt_weight else [None] * B
    extra = [dict(z_plus=p, z_minus=m, branch="tilted" if t else "plain", **({"weight": c} if c is not None else {}))
             for p, m, t, c in zip(got["z_plus"].tolist(), got["z_minus"].tolist(), tilted, weights)]
    return dict(_chosen(ids, mask, logps, n, got["a"], got["b"]), src=[("T+", "T-") if t else ("pi", "pi") for t in tilted],
                extra=extra, forwards=n * B, score_forwards=2 * n * B)

SAMPLERS = {"vanilla": vanilla, "pilaf": pilaf, "best_of_n": best_of_n, "hybrid": hybrid, "t_pilaf": t_pilaf}
OPTIONS = {"best_of_n": ["n"], "t_pilaf": ["n", "prompt_weight"]}   # each sampler's own options: keyword parameters, as on the command line

def options(name):
    """The options sampler `name` takes beyond the common six arguments."""
    return OPTIONS.get(name, [])
