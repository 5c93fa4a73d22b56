"""
A comparison's report, drawn from its run folders (nothing is trained here): results.md in the shape
of the paper's Table 2 (final reward, KL and J = reward - beta*KL, mean +- a 95% t-interval over
seeds), each sampler minus Vanilla paired by seed, Table 1's costs, the labels each sampler needed to
reach Vanilla's final J, and two figures: reward vs KL (the paper's Figures 2-3) and J vs labels.
"""
import json
import os

import matplotlib
matplotlib.use("Agg")   # files only: this module draws into PNGs (a notebook shows them with IPython.display)
import matplotlib.pyplot as plt
import numpy as np

from stats import ci_text, labels_to_reach, mean_ci, mean_curve, paired, paired_cells, reach_interval

NAMES = {"vanilla": "Vanilla", "best_of_n": "Best-of-N", "hybrid": "Hybrid", "pilaf": "PILAF", "t_pilaf": "T-PILAF"}
COLORS = {"vanilla": "tab:gray", "best_of_n": "tab:blue", "hybrid": "tab:green", "pilaf": "tab:red", "t_pilaf": "tab:purple"}

def run_dir(out, sampler, seed):
    return os.path.join(out, f"{sampler}-s{seed}")

def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]

def load_runs(out, samplers, seeds):
    """{sampler: [metrics list of each finished seed, each row tagged with its seed]}; unfinished or
    missing runs are left out."""
    runs = {}
    for s in samplers:
        for seed in seeds:
            d = run_dir(out, s, seed)
            if os.path.exists(os.path.join(d, "summary.json")):
                runs.setdefault(s, []).append([dict(m, seed=seed) for m in read_jsonl(os.path.join(d, "metrics.jsonl"))])
    return runs

def report(runs, beta=0.1):
    """results.md: the paper's Table 2 (final reward, KL, J: mean +- 95% t-interval over seeds), the
    same paired with Vanilla by seed, Table 1's costs, and the labels each sampler needed to reach
    Vanilla's final mean J."""
    final = {s: {k: mean_ci([m[-1][k] for m in r]) for k in ("reward", "kl", "J", "labels", "judged_per_label",
                                                            "fwd_per_pair", "score_fwd_per_pair")} for s, r in runs.items()}
    def separated(s, k, sign):
        """Is s's interval of k entirely on the better side (sign +1: higher) of every other sampler's?"""
        m, h = final[s][k]
        return len(final) > 1 and all(sign * (m - o) > h + ho for t, (o, ho) in ((t, final[t][k]) for t in final) if t != s)
    def cell(s, k, fmt):
        m, h = final[s][k]
        txt = f"{m:{fmt}} ± {h:{fmt}}"
        return f"**{txt}**" if k in ("reward", "kl", "J") and separated(s, k, -1 if k == "kl" else 1) else txt
    lines = ["| Sampler | seeds | reward ↑ | KL ↓ | J = reward − β·KL ↑ | labels | judged / label | sampling fwd / pair |",
             "|---|---|---|---|---|---|---|---|"]
    for s, r in runs.items():
        f = final[s]
        fwd = f"{f['fwd_per_pair'][0]:.2f}" + (f" (+{f['score_fwd_per_pair'][0]:.0f} scoring)" if f["score_fwd_per_pair"][0] else "")
        lines.append(f"| {NAMES.get(s, s)} | {len(r)} | {cell(s, 'reward', '.3f')} | {cell(s, 'kl', '.2f')} | "
                     f"{cell(s, 'J', '.3f')} | {f['labels'][0]:.0f} | {f['judged_per_label'][0]:.0f} | {fwd} |")
    lines += ["", f"Final evaluation, mean ± 95% t-interval over seeds (nan for one seed); in bold only a value whose "
              f"interval lies clear of every other sampler's; β = {beta}. Paper Table 1 "
              "costs per labelled pair: Vanilla 2, Best-of-N (N=8) 8 (+16 scoring passes), Hybrid 2, PILAF ≈3 sampling "
              "forwards; 2 responses judged per label. In iterative mode the first round is Vanilla for every sampler, "
              "so a sampler's forwards per pair average between Vanilla's 2 and its own."]
    if "vanilla" in runs and len(runs) > 1:
        lines += ["", "## Paired by seed: sampler − Vanilla at the end (mean ± 95% t-interval over seeds)", "",
                  "| Sampler | seeds | Δ reward | Δ KL | Δ J |", "|---|---|---|---|---|"]
        for s in runs:
            if s != "vanilla":
                lines.append(f"| {NAMES.get(s, s)} | {len(paired(runs, s, 'J'))} | " + " | ".join(paired_cells(runs, s)) + " |")
    if "pilaf" in runs and "t_pilaf" in runs:
        lines += ["", "## T-PILAF − PILAF, paired by seed, at equal labels", "",
                  "T-PILAF aims at the theory's pairs (sequence-level π±, mixture weight Z₊Z₋/(1+Z₊Z₋)) by resampling "
                  "among --n policy samples, and falls short of them where r_θ spreads widely (results/t_pilaf_n.md); "
                  "PILAF rounds both (token-level π±, weight ½). The difference is the two samplers', not the cost of "
                  "the roundings alone.", "", "| seeds | Δ reward | Δ KL | Δ J |", "|---|---|---|---|",
                  f"| {len(paired(runs, 't_pilaf', 'J', 'pilaf'))} | " + " | ".join(paired_cells(runs, "t_pilaf", "pilaf")) + " |"]
    if all("abs_r" in m[-1] for r in runs.values() for m in r):
        lines += ["", "## How far each policy moved: mean |r_θ| = β·|log π/π_ref| of its samples at the end", "",
                  "PILAF's π± differ from π by the tilt e^{±r_θ}: a few tenths of |r_θ| is a tilt of a few tenths of a nat.", "",
                  "| Sampler | seeds | KL | mean \\|r_θ\\| |", "|---|---|---|---|"]
        lines += [f"| {NAMES.get(s, s)} | {len(r)} | {ci_text([m[-1]['kl'] for m in r], '.2f')} | "
                  f"{ci_text([m[-1]['abs_r'] for m in r])} |" for s, r in runs.items()]
    if "vanilla" in runs:
        target = mean_curve(runs["vanilla"], "J")[0][-1]     # its final mean J, to the last bit as its curve has it
        lines += ["", f"## Annotation efficiency: labels needed to reach Vanilla's final mean J ({target:.3f})", "",
                  "Where the mean J curve over seeds first reaches it; in brackets a 95% bootstrap interval over "
                  "seeds (paired with Vanilla's; coarse with a handful of seeds).", ""]
        for s, r in runs.items():
            at = mean_curve(r, "labels")[0]
            n = labels_to_reach(at, mean_curve(r, "J")[0], target)
            ci = reach_interval(r, runs["vanilla"])
            ci = "" if ci is None else " [" + " – ".join("not reached" if np.isinf(x) else f"{x:.0f}" for x in ci) + "]"
            if n is None:
                said = "not reached"
            elif n in at:
                said = f"{n:.0f} labels"
            else:                                      # between two evaluations: a straight line between them
                hi = int(np.searchsorted(at, n))
                said = f"{n:.0f} labels (interpolated between the evaluations at {at[hi - 1]:.0f} and {at[hi]:.0f})"
            lines.append(f"- {NAMES.get(s, s)}: {said}{ci}")
    evals = min(len(m) for r in runs.values() for m in r)
    if evals <= 2:
        lines += ["", f"Note: each run has only {evals} evaluations, so every curve is a straight line between them and "
                      "the labels-to-reach figures are interpolated along it; pass -- --eval_every smaller for more."]
    return "\n".join(lines) + "\n"

def grid_report(done):
    """One row per grid point: each sampler's final J (mean +- 95% t-interval) and, beside Vanilla's,
    each other sampler's paired difference to it. `done`: (point, runs, config) of each point."""
    samplers = list(dict.fromkeys(s for _, runs, _ in done for s in runs))
    others = [s for s in samplers if s != "vanilla"] if "vanilla" in samplers else []
    keys = list(done[0][0].point)
    lines = ["| " + " | ".join(keys + ["seeds"] + [f"{NAMES.get(s, s)} J" for s in samplers] +
                                [f"{NAMES.get(s, s)} − Vanilla Δ J" for s in others]) + " |",
             "|" + "---|" * (len(keys) + 1 + len(samplers) + len(others))]
    for p, runs, _ in done:
        cells = [str(p.point[k]) for k in keys] + [str(max(len(r) for r in runs.values()))]
        cells += [ci_text([m[-1]["J"] for m in runs[s]]) if s in runs else "–" for s in samplers]
        cells += [ci_text(paired(runs, s, "J"), sign="+") if s in runs and "vanilla" in runs else "–" for s in others]
        lines.append("| " + " | ".join(cells) + " |")
    betas = {cfg["beta"] for _, _, cfg in done}      # one, unless beta is an axis of the grid
    beta = betas.pop() if len(betas) == 1 else "β"
    lines += ["", f"Final J = reward − {beta}·KL, mean ± 95% t-interval over seeds; Δ J paired by seed. Each point's "
              "folder holds its full report (results.md) and figures."]
    return "\n".join(lines) + "\n"

def plot_reward_kl(runs, path, beta=0.1):
    """Reward vs KL, a point per evaluation (mean over seeds), like the paper's Figures 2-3. Dotted
    lines are iso-J lines (reward - beta*KL = const): up and to the left is better; the big dot is
    the final evaluation."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for s, r in runs.items():
        kl, reward = mean_curve(r, "kl")[0], mean_curve(r, "reward")[0]
        ax.plot(kl, reward, "o-", ms=3, color=COLORS.get(s), label=NAMES.get(s, s))
        ax.plot(kl[-1], reward[-1], "o", ms=8, color=COLORS.get(s))   # the big dot: the end of training
    x0, x1 = ax.get_xlim()
    y0, y1 = ax.get_ylim()
    for c in np.linspace(y0 - beta * x1, y1, 8):
        ax.plot([x0, x1], [c + beta * x0, c + beta * x1], ":", color="0.7", lw=0.8, zorder=0)
    ax.set(xlim=(x0, x1), ylim=(y0, y1), xlabel="KL(π ‖ π_ref)  [nats / response]", ylabel="oracle reward",
           title="reward vs KL (mean over seeds; dotted: equal J)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)

def plot_j_labels(runs, path):
    """J vs labels used, the mean over seeds and its 95% t-interval (the tables' interval): annotation
    efficiency. Dashed: Vanilla's final J."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for s, r in runs.items():
        x, m = mean_curve(r, "labels")[0], mean_curve(r, "J")[0]
        n = min(len(run) for run in r)
        h = np.array([mean_ci([run[i]["J"] for run in r])[1] for i in range(n)])   # nan with one seed: no band
        ax.plot(x, m, "o-", ms=3, color=COLORS.get(s), label=NAMES.get(s, s))
        ax.fill_between(x, m - h, m + h, color=COLORS.get(s), alpha=0.15, lw=0)
    if "vanilla" in runs:
        ax.axhline(mean_curve(runs["vanilla"], "J")[0][-1], ls="--", color=COLORS["vanilla"], lw=0.8)
    ax.set(xlabel="preference labels used", ylabel="J = reward − β·KL", title="J vs labels (mean, 95% interval over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)

def write_report(p, runs, cfg):
    """A point's results.md and figures in its folder. -> the report's text"""
    text = report(runs, cfg["beta"])
    title = ", ".join(f"{k}={v}" for k, v in p.point.items())
    with open(os.path.join(p.out, "results.md"), "w") as f:
        f.write(f"# {cfg['mode']} DPO: {', '.join(NAMES.get(s, s) for s in runs)} ({title or p.out})\n\n" + text)
    plot_reward_kl(runs, os.path.join(p.out, "reward_kl.png"), cfg["beta"])
    plot_j_labels(runs, os.path.join(p.out, "j_labels.png"))
    return text
