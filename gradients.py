"""
The gradient PILAF is meant to follow, measured on the real LM (paper Sec. 5; notebook 01 computes
the same on a bandit exactly). At a policy checkpoint:

    (a) grad J, J = E[r] - beta*KL(pi || pi_ref), by the policy gradient
            grad J = E_pi[(r(y) - beta*log(pi(y)/pi_ref(y)) - b(x)) grad log pi(y)]
        with the oracle's reward r and a per-prompt baseline b(x): the mean of the other samples of the
        same prompt (leave one out, so the estimate stays unbiased);
    (b) for each sampler, the expected DPO update over its pairs, the oracle's Bradley-Terry
        probability p = sigmoid(r(a) - r(b)) as a soft label (no label noise in the estimate):
            - grad E[-p log sigmoid(D) - (1-p) log sigmoid(-D)] = E[(p - sigmoid(D)) grad D],
        D = beta*log(pi(a)/pi_ref(a)) - beta*log(pi(b)/pi_ref(b)): the direction a DPO step on those
        pairs moves the policy;
    and the cosine of each (b) with (a), over independent batches. The noise ceiling: the cosine c
    between two halves of (a) made from disjoint samples; sqrt(2c/(1+c)) is what a (b) exactly along
    grad J would score against the whole (a), whose noise is half a half's.

The claim under test: with T-PILAF's pairs the DPO update follows grad J (to first order in the
reward gaps), with Vanilla's it is weighted by sigma'(D) and does not, by a margin that grows with
|r_theta|; PILAF rounds T-PILAF twice (token-level tilts, probability 1/2).

    python gradients.py --policy out/pilaf-online-s0/policy            # one checkpoint: a table
"""
import omp  # noqa: F401  (first: how the CPU threads wait, set before torch loads; omp.py says why)

import argparse
import json
import math
import os
import sys

import torch

import load
import pilaf
import train
import world
from dpo import log_ratio, pair_logps, sequence_logps
from oracle import Oracle
from pairs import decode, tokenize
from sample import generate
from stats import mean_ci

SAMPLERS = ["vanilla", "pilaf", "t_pilaf", "best_of_n", "hybrid"]
CHUNK = 256   # rows per forward and backward: the gradients are sums, taken a chunk at a time

def flat_grad(policy, rows, surrogate):
    """The gradient of sum over chunks of surrogate(chunk) w.r.t. the policy's weights, flattened.
    `rows`: the number of rows; surrogate(lo, hi) -> a scalar whose gradient is that chunk's share."""
    params = [p for p in policy.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for lo in range(0, rows, CHUNK):
        for t, g in zip(total, torch.autograd.grad(surrogate(lo, min(rows, lo + CHUNK)), params, allow_unused=True)):
            if g is not None:
                t += g
    return torch.cat([t.flatten() for t in total])

def sample(policy, tok, prompts, k, max_new_tokens, eos, g):
    """k samples of the policy for each prompt, at temperature 1: sample j of prompt i is row j*P + i."""
    texts = prompts * k
    ids_p, mask_p = tokenize(tok, texts, policy.device)
    ids, mask, _ = generate([policy], [1.0], ids_p, mask_p, max_new_tokens, eos, tok.pad_token_id, 1.0, g)
    return texts, ids_p, mask_p, ids, mask

def objective_gradient(policy, ref, tok, oracle, prompts, beta, samples, max_new_tokens, eos, g):
    """(a): the policy-gradient estimate of grad J from `samples` responses per prompt, in two halves
    of disjoint samples, each with its own leave-one-out baseline. -> (half 1, half 2), flat vectors;
    the whole estimate is their mean."""
    texts, ids_p, mask_p, ids, mask = sample(policy, tok, prompts, samples, max_new_tokens, eos, g)
    P, h = len(prompts), samples // 2
    with torch.no_grad():
        value = oracle.score(texts, decode(tok, ids, mask)).to(policy.device).double() \
            - beta * log_ratio(policy, ref, ids_p, mask_p, ids, mask).double()           # (samples * P,)
    halves = []
    for part in (slice(0, h * P), slice(h * P, 2 * h * P)):
        v = value[part].view(h, P)                                                      # (h, P)
        adv = (v - (v.sum(0) - v) / (h - 1)).flatten().float()                         # value - leave-one-out baseline
        rows = [t[part] for t in (ids_p, mask_p, ids, mask)]
        halves.append(flat_grad(policy, len(adv), lambda lo, hi: (adv[lo:hi] * sequence_logps(
            policy, *(t[lo:hi] for t in rows))).sum() / len(adv)))
    return halves

def dpo_update(policy, ref, tok, oracle, prompts, beta, sampler, pairs, max_new_tokens, eos, g, n=8):
    """(b): the expected DPO update over `pairs` pairs per prompt of `sampler`, the oracle's
    Bradley-Terry probability as the soft label. -> flat vector"""
    texts = prompts * pairs
    ids_p, mask_p = tokenize(tok, texts, policy.device)
    opts = {k: v for k, v in dict(n=n).items() if k in pilaf.options(sampler)}
    gen = dict(max_new_tokens=max_new_tokens, eos_id=eos, pad_id=tok.pad_token_id, temperature=1.0, generator=g)
    with torch.no_grad():
        out = pilaf.SAMPLERS[sampler](policy, ref, ids_p, mask_p, beta, gen, **opts)
        p = torch.sigmoid(oracle.score(texts, decode(tok, out["a"], out["a_mask"]))
                          - oracle.score(texts, decode(tok, out["b"], out["b_mask"]))).to(policy.device)
        rows = (ids_p, mask_p, out["a"], out["a_mask"], out["b"], out["b_mask"])
        ra, rb = pair_logps(ref, *rows)

    def surrogate(lo, hi):   # sum of w * D with w = p - sigmoid(D) held fixed: its gradient is sum of w * grad D
        pa, pb = pair_logps(policy, *(t[lo:hi] for t in rows))
        D = beta * ((pa - ra[lo:hi]) - (pb - rb[lo:hi]))
        return ((p[lo:hi] - torch.sigmoid(D)).detach() * D).sum() / len(texts)
    return flat_grad(policy, len(texts), surrogate)

def cosine(u, v):
    return (u @ v / (u.norm() * v.norm())).item()

def measure(policy, ref, tok, oracle, prompts, beta=0.1, samplers=SAMPLERS, batches=5, samples=16, pairs=8,
            max_new_tokens=32, eos=None, seed=0, n=8):
    """cos((b), (a)) of each sampler and the noise ceiling, over independent batches: each batch
    draws its own (a) and its own pairs. -> dict: sampler -> [cosine per batch], "ceiling" -> [...],
    "halves" -> [cosine of the two halves of (a)]"""
    eos = tok.eos_token_id if eos is None else eos
    policy.eval().requires_grad_(True)
    got = {s: [] for s in ["ceiling", "halves", *samplers]}
    for k in range(batches):
        g = torch.Generator(policy.device).manual_seed(seed + 1000 * k)
        h1, h2 = objective_gradient(policy, ref, tok, oracle, prompts, beta, samples, max_new_tokens, eos, g)
        a, c = (h1 + h2) / 2, cosine(h1, h2)
        got["halves"].append(c)
        got["ceiling"].append(math.sqrt(max(2 * c / (1 + c), 0.0)))
        for s in samplers:
            got[s].append(cosine(dpo_update(policy, ref, tok, oracle, prompts, beta, s, pairs, max_new_tokens, eos, g, n), a))
    return got

def table(rows, samplers=SAMPLERS):
    """Markdown: one line per checkpoint, cos((b), grad J) of each sampler (mean +- 95% t-interval over
    batches), the ceiling, and PILAF's and T-PILAF's cosine minus Vanilla's paired by batch (each batch
    measures every sampler against the same (a), so the pairing removes (a)'s noise).
    rows: [(name, measure()'s dict, its KL on the held-out prompts)]"""
    names = dict(vanilla="Vanilla", pilaf="PILAF", t_pilaf="T-PILAF", best_of_n="Best-of-N", hybrid="Hybrid")
    deltas = [s for s in ("pilaf", "t_pilaf") if s in samplers and "vanilla" in samplers]
    head = ["checkpoint", "KL"] + [names[s] for s in samplers] + ["ceiling"] + [f"{names[s]} − Vanilla" for s in deltas]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, got, kl in rows:
        cols = [got[s] for s in samplers + ["ceiling"]] + [[x - v for x, v in zip(got[s], got["vanilla"])] for s in deltas]
        cells = [f"{m:+.3f} ± {h:.3f}" for m, h in map(mean_ci, cols)]
        out.append(f"| {name} | {kl:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"

def main(argv=None):
    p = argparse.ArgumentParser(description="cos(expected DPO update of each sampler, grad J) at a checkpoint.")
    p.add_argument("--policy", required=True, nargs="+", help="policy folders to measure (save_pretrained)")
    p.add_argument("--world", default=world.DEFAULT_DIR, help="the embedded world: reference, oracle, prompts")
    p.add_argument("--beta", type=float, default=0.1, help="beta of J and of the DPO loss")
    p.add_argument("--batches", type=int, default=5, help="independent batches (the interval is over them)")
    p.add_argument("--samples", type=int, default=16, help="policy samples per prompt for (a)")
    p.add_argument("--pairs", type=int, default=8, help="pairs per prompt for each (b)")
    p.add_argument("--seed", type=int, default=0, help="seeds every batch")
    p.add_argument("--json", help="also write every batch's cosines here, per checkpoint (JSON)")
    args = p.parse_args(argv)
    if args.samples < 4 or args.samples % 2 or args.batches < 1 or args.pairs < 1:
        sys.exit("gradients.py: error: --samples must be even and at least 4 (two halves, each with a baseline), "
                 "--batches and --pairs positive")
    d = world.ensure(args.world)
    ref, tok = load.load_policy(os.path.join(d, "policy"))
    oracle = Oracle(*load.load_oracle(os.path.join(d, "oracle")))
    prompts, test = load.load_prompts(os.path.join(d, "prompts"))
    ref.requires_grad_(False)
    eos, rows = load.eos_ids(ref, tok), []
    for path in args.policy:
        policy, _ = load.load_policy(path)
        kl = train.evaluate(policy, ref, tok, oracle, test, args.beta, 8, 32, args.seed, eos)["kl"]
        got = measure(policy, ref, tok, oracle, prompts, args.beta, batches=args.batches, samples=args.samples,
                      pairs=args.pairs, eos=eos, seed=args.seed)
        rows.append((path, got, kl))
        print(table(rows[-1:]), flush=True)
        if args.json:
            with open(args.json + ".tmp", "w") as f:
                json.dump([dict(checkpoint=n, kl=k, cosines=g) for n, g, k in rows], f, indent=1)
            os.replace(args.json + ".tmp", args.json)
    print(table(rows))

if __name__ == "__main__":
    main()
