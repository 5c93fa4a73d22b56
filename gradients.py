"""
The gradient PILAF is meant to follow, measured on the real LM (paper Sec. 5; notebook 01 computes
the same on a bandit exactly). At a policy checkpoint:

    (a) grad J, J = E[r] - beta*KL(pi || pi_ref), by the policy gradient
            grad J = E_pi[(r(y) - beta*log(pi(y)/pi_ref(y)) - b(x)) grad log pi(y)]
        with the oracle's reward r and a per-prompt baseline b(x): the mean of the other samples of the
        same prompt (leave one out, so the estimate stays unbiased); and beside it
        (a') sum_x grad J_x / C(x), C(x) = 2 + 2*Z+Z-(x), Z+- = E_pi[e^{+-r_theta}] estimated from the
        same samples: what T-PILAF's expected update is proportional to with one pair per prompt, drawn
        uniformly (notebook 01); --prompt_weight's pairs undo the 1/C(x) and aim at (a) itself;
    (b) for each sampler, the expected DPO update over its pairs, the oracle's Bradley-Terry
        probability p = sigmoid(r(a) - r(b)) as a soft label (no label noise in the estimate):
            - grad E[-p log sigmoid(D) - (1-p) log sigmoid(-D)] = E[(p - sigmoid(D)) grad D],
        D = beta*log(pi(a)/pi_ref(a)) - beta*log(pi(b)/pi_ref(b)): the direction a DPO step on those
        pairs moves the policy (times a pair's loss weight, where its sampler gives one);
    and the cosine of each (b) with (a) and with (a'), over independent batches. Every vector is made
    twice, from two disjoint halves of its samples or pairs, and the cosine is debiased:

        cos(a, b) = (<a1, b2> + <a2, b1>) / 2 / sqrt(<a1, a2> <b1, b2>)

    Each inner product pairs independent halves, so the noise in each vector adds nothing to them in
    expectation: the cosine of the expected vectors, which a plain cosine of noisy estimates would
    shrink toward 0 (nan where a noisy <a1, a2> or <b1, b2> comes out negative).

The claim under test: with T-PILAF's pairs the DPO update follows (a') (to first order in the
reward gaps), with its prompt weight (a); with Vanilla's each pair is weighted by sigma'(D) and it
follows neither, by a margin that grows with |r_theta|; PILAF rounds T-PILAF twice (token-level tilts,
probability 1/2).

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

# what is measured: a name -> (sampler, its own options; --n is given to those that take it)
SAMPLERS = {"vanilla": ("vanilla", {}), "pilaf": ("pilaf", {}), "t_pilaf": ("t_pilaf", {}),
            "t_pilaf_weighted": ("t_pilaf", dict(prompt_weight=True)), "best_of_n": ("best_of_n", {}),
            "hybrid": ("hybrid", {})}
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
    """(a) and (a'), each from two halves of disjoint samples (`samples` per prompt in all), each half
    with its own leave-one-out baseline and its own estimate of C(x). -> ((a1, a2), (a'1, a'2)), flat
    vectors: the whole estimates are the halves' means."""
    texts, ids_p, mask_p, ids, mask = sample(policy, tok, prompts, samples, max_new_tokens, eos, g)
    P, h = len(prompts), samples // 2
    with torch.no_grad():
        r_theta = beta * log_ratio(policy, ref, ids_p, mask_p, ids, mask).double()       # (samples * P,)
        value = oracle.score(texts, decode(tok, ids, mask)).to(policy.device).double() - r_theta
    grads, weighted = [], []
    for part in (slice(0, h * P), slice(h * P, 2 * h * P)):
        v, rt = value[part].view(h, P), r_theta[part].view(h, P)                          # (h, P)
        adv = (v - (v.sum(0) - v) / (h - 1)).flatten().float()                         # value - leave-one-out baseline
        C = (2 + 2 * rt.exp().mean(0) * (-rt).exp().mean(0)).repeat(h).float()         # (h * P,) C(x) of each row's prompt
        rows = [t[part] for t in (ids_p, mask_p, ids, mask)]
        for out, w in ((grads, 1.0), (weighted, 1 / C)):
            out.append(flat_grad(policy, len(adv), lambda lo, hi, w=w: ((adv * w)[lo:hi] * sequence_logps(
                policy, *(t[lo:hi] for t in rows))).sum() / len(adv)))
    return tuple(grads), tuple(weighted)

def dpo_update(policy, ref, tok, oracle, prompts, beta, sampler, pairs, max_new_tokens, eos, g, n=8):
    """(b): the expected DPO update over `pairs` pairs per prompt of `sampler` (a name of SAMPLERS),
    the oracle's Bradley-Terry probability as the soft label, each pair's loss weight where the sampler
    gives one; twice, from two disjoint halves of the pairs. -> (b1, b2), flat vectors"""
    name, opts = SAMPLERS[sampler]
    opts = dict(opts, **({"n": n} if "n" in pilaf.options(name) else {}))
    texts = prompts * pairs
    ids_p, mask_p = tokenize(tok, texts, policy.device)
    gen = dict(max_new_tokens=max_new_tokens, eos_id=eos, pad_id=tok.pad_token_id, temperature=1.0, generator=g)
    with torch.no_grad():
        out = pilaf.SAMPLERS[name](policy, ref, ids_p, mask_p, beta, gen, **opts)
        p = torch.sigmoid(oracle.score(texts, decode(tok, out["a"], out["a_mask"]))
                          - oracle.score(texts, decode(tok, out["b"], out["b_mask"]))).to(policy.device)
        w = torch.tensor([(e or {}).get("weight", 1.0) for e in out.get("extra") or [None] * len(texts)], device=p.device)
        rows = (ids_p, mask_p, out["a"], out["a_mask"], out["b"], out["b_mask"])
        ra, rb = pair_logps(ref, *rows)
    half = len(prompts) * (pairs // 2)

    def surrogate(lo, hi):   # sum of w * c * D with c = p - sigmoid(D) held fixed: its gradient is sum of w * c * grad D
        pa, pb = pair_logps(policy, *(t[lo:hi] for t in rows))
        D = beta * ((pa - ra[lo:hi]) - (pb - rb[lo:hi]))
        return (w[lo:hi] * (p[lo:hi] - torch.sigmoid(D)).detach() * D).sum() / half
    shift = lambda f, at: (lambda lo, hi: f(lo + at, hi + at))
    return flat_grad(policy, half, surrogate), flat_grad(policy, half, shift(surrogate, half))

def debiased_cosine(a, b):
    """The cosine of two expected vectors from two independent halves of each: a = (a1, a2), b = (b1, b2)."""
    (a1, a2), (b1, b2) = a, b
    norm = (a1 @ a2) * (b1 @ b2)
    return ((a1 @ b2 + a2 @ b1) / 2 / norm.sqrt()).item() if norm > 0 else float("nan")

def measure(policy, ref, tok, oracle, prompts, beta=0.1, samplers=tuple(SAMPLERS), batches=20, samples=16, pairs=8,
            max_new_tokens=32, eos=None, seed=0, n=8):
    """The debiased cosine of each sampler's (b) with (a) and with (a'), over independent batches: each
    batch draws its own (a), (a') and pairs. -> dict: sampler -> [cosine with grad J per batch],
    sampler + "/C" -> [cosine with (a') per batch], "a/C" -> [cosine of (a) with (a')]"""
    eos = tok.eos_token_id if eos is None else eos
    policy.eval().requires_grad_(True)
    got = {k: [] for s in samplers for k in (s, s + "/C")}
    got["a/C"] = []
    for k in range(batches):
        g = torch.Generator(policy.device).manual_seed(seed + 1000 * k)
        a, a_c = objective_gradient(policy, ref, tok, oracle, prompts, beta, samples, max_new_tokens, eos, g)
        got["a/C"].append(debiased_cosine(a, a_c))
        for s in samplers:
            b = dpo_update(policy, ref, tok, oracle, prompts, beta, s, pairs, max_new_tokens, eos, g, n)
            got[s].append(debiased_cosine(b, a))
            got[s + "/C"].append(debiased_cosine(b, a_c))
    return got

NAMES = dict(vanilla="Vanilla", pilaf="PILAF", t_pilaf="T-PILAF", t_pilaf_weighted="T-PILAF weighted",
             best_of_n="Best-of-N", hybrid="Hybrid")

def table(rows, samplers=tuple(SAMPLERS)):
    """Markdown: one line per checkpoint and target, the debiased cos((b), target) of each sampler (mean
    +- 95% t-interval over batches, nan batches left out), and each sampler's cosine minus Vanilla's,
    paired by batch (each batch measures every sampler against the same target, so the pairing removes
    the target's noise). rows: [(name, measure()'s dict, its KL on the held-out prompts)]"""
    others = [s for s in samplers if s != "vanilla"] if "vanilla" in samplers else []
    head = ["checkpoint", "KL", "target"] + [NAMES.get(s, s) for s in samplers] + [f"{NAMES.get(s, s)} − Vanilla" for s in others]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ok = lambda xs: [x for x in xs if not math.isnan(x)]
    for name, got, kl in rows:
        for target, key in (("∇J", ""), ("Σ∇J_x/C(x)", "/C")):
            cols = [ok(got[s + key]) for s in samplers] + \
                   [ok([x - v for x, v in zip(got[s + key], got["vanilla" + key])]) for s in others]
            cells = [f"{m:+.3f} ± {h:.3f} ({len(c)})" for c in cols for m, h in [mean_ci(c) if c else (math.nan, math.nan)]]
            out.append(f"| {name} | {kl:.1f} | {target} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"

def main(argv=None):
    p = argparse.ArgumentParser(description="cos(expected DPO update of each sampler, grad J) at a checkpoint.")
    p.add_argument("--policy", required=True, nargs="+", help="policy folders to measure (save_pretrained)")
    p.add_argument("--world", default=world.DEFAULT_DIR, help="the embedded world: reference, oracle, prompts")
    p.add_argument("--beta", type=float, default=0.1, help="beta of J and of the DPO loss")
    p.add_argument("--batches", type=int, default=20, help="independent batches (the interval is over them)")
    p.add_argument("--samples", type=int, default=16, help="policy samples per prompt for (a)")
    p.add_argument("--pairs", type=int, default=8, help="pairs per prompt for each (b), in two halves")
    p.add_argument("--n", type=int, default=8, help="candidates per prompt of best_of_n and t_pilaf")
    p.add_argument("--seed", type=int, default=0, help="seeds every batch")
    p.add_argument("--prompts", type=int, default=None, help="the first this many training prompts (default: all)")
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS), help="what to measure")
    p.add_argument("--json", help="also write every batch's cosines here, per checkpoint (JSON)")
    args = p.parse_args(argv)
    if args.samples < 4 or args.samples % 2 or args.pairs < 2 or args.pairs % 2 or args.batches < 1 or args.n < 4:
        sys.exit("gradients.py: error: --samples must be even and at least 4 (two halves, each with a baseline), "
                 "--pairs even and at least 2 (two halves), --batches positive, --n at least 4")
    d = world.ensure(args.world)
    ref, tok = load.load_policy(os.path.join(d, "policy"))
    oracle = Oracle(*load.load_oracle(os.path.join(d, "oracle")))
    prompts, test = load.load_prompts(os.path.join(d, "prompts"))
    prompts = prompts[:args.prompts]
    ref.requires_grad_(False)
    eos, rows = load.eos_ids(ref, tok), []
    for path in args.policy:
        policy, _ = load.load_policy(path)
        kl = train.evaluate(policy, ref, tok, oracle, test, args.beta, 8, 32, args.seed, eos)["kl"]
        got = measure(policy, ref, tok, oracle, prompts, args.beta, samplers=args.samplers, batches=args.batches,
                      samples=args.samples, pairs=args.pairs, eos=eos, seed=args.seed, n=args.n)
        rows.append((path, got, kl))
        print(table(rows[-1:], args.samplers), flush=True)
        if args.json:
            with open(args.json + ".tmp", "w") as f:
                json.dump([dict(checkpoint=n, kl=k, cosines=g) for n, g, k in rows], f, indent=1)
            os.replace(args.json + ".tmp", args.json)
    print(table(rows, args.samplers))

if __name__ == "__main__":
    main()
