"""
experiments/dose/protocol.md's analysis: reads the continuations' run folders and t_pilaf_n's doses,
writes results/dose.md. Nothing is trained here.

    python experiments/dose/analyse.py --doses results/t_pilaf_n.json --out results/dose.md
"""
import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from report import load_runs  # noqa: E402
from stats import T975, ci_text, mean_ci  # noqa: E402

STARTS = ["0000000", "0004096", "0006144", "0020480", "0026624"]
ARMS = {"pilaf": "PILAF", "t_pilaf": "T-PILAF", "t_pilaf_weighted": "T-PILAF weighted", "best_of_n": "Best-of-N"}

def runs_at(out, start):
    """{arm: {seed: metrics rows}} of one starting point (the weighted T-PILAF from its own folder)."""
    got = {}
    for folder, samplers, rename in ((f"start-{start}", ["vanilla", "pilaf", "t_pilaf", "best_of_n"], {}),
                                     (f"start-{start}-weighted", ["t_pilaf"], {"t_pilaf": "t_pilaf_weighted"})):
        for s, rs in load_runs(os.path.join(out, folder), samplers, range(20)).items():
            got[rename.get(s, s)] = {r[0]["seed"]: r for r in rs}
    return got

def paired(runs, arm, key, base="vanilla"):
    return [runs[arm][s][-1][key] - runs[base][s][-1][key] for s in sorted(runs[arm]) if s in runs.get(base, {})]

def slope(x, y):
    """OLS slope of y on x and the half-width of its 95% t-interval."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    sxx = ((x - x.mean()) ** 2).sum()
    b = ((x - x.mean()) * (y - y.mean())).sum() / sxx
    res = y - y.mean() - b * (x - x.mean())
    se = np.sqrt((res ** 2).sum() / (len(x) - 2) / sxx)
    return b, T975[max(d for d in T975 if d <= len(x) - 2)] * se

def verdict(lo, hi):
    return "supported" if lo > 0 else "refuted" if hi < 0 else "not established"

def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", default=os.path.join(ROOT, "out", "experiments", "dose"))
    p.add_argument("--doses", required=True, help="t_pilaf_n/measure.py's JSON at the starting points")
    p.add_argument("--n", type=int, required=True, help="N* (the N the runs used)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    dose = {row["policy"].split("labels-")[1][:7]: row["log_zz"] for row in json.load(open(args.doses)) if row["n"] == 256}
    at = {L: runs_at(args.runs, L) for L in STARTS}
    lines = ["# dose: each sampler's gain over Vanilla along the path (experiments/dose/protocol.md)", "",
             f"Continuations of 512 labels from checkpoints of `path/` (exploratory; Vanilla, β 0.025), T-PILAF and "
             f"Best-of-N at N = {args.n}; ΔJ = final J minus Vanilla's, paired by seed, mean ± 95% t-interval.", "",
             "| start (labels) | seeds | KL at start | mean \\|r_θ\\| | dose: mean log Z₊Z₋ | " +
             " | ".join(f"{v} Δ J" for v in ARMS.values()) + " |", "|" + "---|" * (5 + len(ARMS))]
    for L in STARTS:
        r = at[L]
        first = [m[0] for m in r["vanilla"].values()]
        cells = [ci_text(paired(r, a, "J"), ".3f", "+") if a in r else "–" for a in ARMS]
        lines.append(f"| {int(L)} | {len(r['vanilla'])} | {ci_text([m['kl'] for m in first], '.2f')} | "
                     f"{np.mean([m['abs_r'] for m in first]):.3f} | {dose[L]:.3f} | " + " | ".join(cells) + " |")
    lines += ["", "The pairs' mean gap |Δ_θ| over each arm's steps (mean over seeds):", "",
              "| start | Vanilla | " + " | ".join(ARMS.values()) + " |", "|" + "---|" * (2 + len(ARMS))]
    for L in STARTS:
        g = lambda a: np.mean([m[-1]["gap"] for m in at[L][a].values()]) if a in at[L] else float("nan")
        lines.append(f"| {int(L)} | {g('vanilla'):.3f} | " + " | ".join(f"{g(a):.3f}" for a in ARMS) + " |")
    lines += ["", "## Hypotheses", ""]
    for a, name in ARMS.items():
        xs, ys = zip(*[(dose[L], d) for L in STARTS for d in paired(at[L], a, "J")])
        b, h = slope(xs, ys)
        tag = f"**H1**, PILAF: {verdict(b - h, b + h)}" if a == "pilaf" else "secondary"
        lines.append(f"- Slope of {name}'s ΔJ on the dose: {b:+.3f} ± {h:.3f} per unit of log Z₊Z₋ ({len(xs)} runs) — {tag}.")
    far = [L for L in STARTS if dose[L] > 1]
    if not far:
        lines.append("- **H2**, **H3**: no starting point has a dose above 1: untested.")
    for L in far:
        d2 = [x - y for x, y in zip(paired(at[L], "t_pilaf_weighted", "J"), paired(at[L], "pilaf", "J"))]
        d3 = [x - y for x, y in zip(paired(at[L], "t_pilaf_weighted", "J"), paired(at[L], "best_of_n", "J"))]
        (m2, h2), (m3, h3) = mean_ci(d2), mean_ci(d3)
        gaps = {a: np.mean([m[-1]["gap"] for m in at[L][a].values()]) for a in ("t_pilaf_weighted", "best_of_n")}
        lines.append(f"- At {int(L)} labels (dose {dose[L]:.2f}): **H2** T-PILAF weighted − PILAF {m2:+.3f} ± {h2:.3f}: "
                     f"{verdict(m2 - h2, m2 + h2)}; **H3** T-PILAF weighted − Best-of-N {m3:+.3f} ± {h3:.3f} "
                     f"(gaps {gaps['t_pilaf_weighted']:.3f} against {gaps['best_of_n']:.3f}): "
                     f"{verdict(m3 - h3, m3 + h3) if gaps['t_pilaf_weighted'] <= gaps['best_of_n'] else 'not the comparison H3 names (T-PILAF’s gaps are larger)'}.")
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))

if __name__ == "__main__":
    main()
