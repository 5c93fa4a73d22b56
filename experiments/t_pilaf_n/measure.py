"""
How far T-PILAF's resampled pairs fall short of the exact tilt, by the number of candidates N, on the
embedded world (experiments/t_pilaf_n/protocol.md). At each policy and N: t_pilaf's pairs for every
training prompt, `repeats` times, and of them: the share of tilted pairs, the mean log Z+Z- of the
prompts, and the tilted pairs' mean gap r_theta(y+) - r_theta(y-), which grows toward the exact
E_{pi+}[r] - E_{pi-}[r] as N grows (resampling from N/2 candidates falls short by O(1/N)).

    python experiments/t_pilaf_n/measure.py --policy <folder> ... --beta 0.025 --out results/t_pilaf_n.json
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import omp  # noqa: E402,F401  (first of the project: how the CPU threads wait)

import argparse
import json

import torch

import load  # noqa: E402
import pilaf  # noqa: E402
import world  # noqa: E402
from dpo import log_ratio  # noqa: E402
from pairs import tokenize  # noqa: E402

def measure(policy, ref, tok, prompts, beta, n, repeats, eos, seed=0):
    texts = prompts * repeats
    ids, mask = tokenize(tok, texts, "cpu")
    gen = dict(max_new_tokens=32, eos_id=eos, pad_id=tok.pad_token_id, temperature=1.0,
               generator=torch.Generator().manual_seed(seed))
    gaps, tilted, logzz = [], [], []
    for i in range(0, len(texts), 32):       # batches of 32 prompts, as a run's
        out = pilaf.t_pilaf(policy, ref, ids[i:i + 32], mask[i:i + 32], beta, gen, n=n)
        with torch.no_grad():
            ra = beta * log_ratio(policy, ref, ids[i:i + 32], mask[i:i + 32], out["a"], out["a_mask"])
            rb = beta * log_ratio(policy, ref, ids[i:i + 32], mask[i:i + 32], out["b"], out["b_mask"])
        t = torch.tensor([e["branch"] == "tilted" for e in out["extra"]])
        gaps += (ra - rb)[t].tolist()
        tilted += t.tolist()
        logzz += [float(torch.log(torch.tensor(e["z_plus"] * e["z_minus"]))) for e in out["extra"]]
    m = lambda xs: sum(xs) / len(xs)
    se = lambda xs: (sum((x - m(xs)) ** 2 for x in xs) / (len(xs) - 1) / len(xs)) ** 0.5
    return dict(n=n, tilted=m(tilted), log_zz=m(logzz), gap=m(gaps), gap_se=se(gaps), pairs=len(texts))

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", nargs="+", required=True)
    p.add_argument("--beta", type=float, required=True)
    p.add_argument("--n", type=int, nargs="+", default=[4, 8, 16, 32, 64, 256])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    d = world.ensure()
    ref, tok = load.load_policy(os.path.join(d, "policy"))
    prompts, _ = load.load_prompts(os.path.join(d, "prompts"))
    eos = load.eos_ids(ref, tok)
    got = []
    for path in args.policy:
        policy, _ = load.load_policy(path)
        for n in args.n:
            row = dict(policy=path, **measure(policy, ref, tok, prompts, args.beta, n, args.repeats, eos))
            print(json.dumps(row), flush=True)
            got.append(row)
    with open(args.out, "w") as f:
        json.dump(got, f, indent=1)

if __name__ == "__main__":
    main()
