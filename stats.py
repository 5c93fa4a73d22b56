"""
The statistics of a comparison, apart from any plotting or training code (compare.py, report.py,
gradients.py and the notebooks use them): 95% t-intervals over seeds, differences paired by seed,
the labels a mean J curve needs to reach a target, and a paired bootstrap interval for that.

A run is its list of metrics.jsonl rows (each tagged with its seed); `runs` maps a sampler to its
finished runs.
"""
import numpy as np

def mean_std(values):
    """Mean and sample standard deviation (ddof=1; 0 for a single seed)."""
    v = np.asarray(values, dtype=float)
    return v.mean(), (v.std(ddof=1) if len(v) > 1 else 0.0)

# Student's t quantile t_{0.975, df}: a 95% interval for a mean over a handful of seeds (df = seeds - 1)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000}

def mean_ci(values):
    """Mean and the half-width of its 95% t-interval (nan for a single value)."""
    m, sd = mean_std(values)
    if len(values) < 2:
        return m, float("nan")
    # between tabulated df, the nearest one below: its t is larger, so the interval is never too narrow
    t = T975[max(d for d in T975 if d <= len(values) - 1)]
    return m, t * sd / np.sqrt(len(values))

def ci_text(values, fmt=".3f", sign=""):
    """'mean ± half-width' of the 95% t-interval; sign="+" writes differences as +0.300 ± 2.541."""
    m, h = mean_ci(values)
    return f"{m:{sign}{fmt}} ± {h:{fmt}}"

def mean_curve(seed_runs, key):
    """Mean and std over seeds of `key` at each evaluation. Every seed evaluates at the same label
    counts (the schedule is fixed by the budget), so evaluations are matched by position."""
    n = min(len(m) for m in seed_runs)
    v = np.array([[m[i][key] for i in range(n)] for m in seed_runs], dtype=float)   # (seeds, evals)
    return v.mean(0), (v.std(0, ddof=1) if len(v) > 1 else np.zeros(n))

def labels_to_reach(labels, J, target):
    """Labels at which the mean J curve first reaches `target`, linearly interpolated between
    evaluations; None if it never does."""
    for i in range(len(J)):
        if J[i] >= target:
            if i == 0:
                return float(labels[0])
            return float(labels[i - 1] + (target - J[i - 1]) / (J[i] - J[i - 1]) * (labels[i] - labels[i - 1]))
    return None

def reach_interval(r, van, resamples=2000):
    """95% bootstrap interval of labels_to_reach(sampler's mean J curve, Vanilla's final mean J): the
    seeds both share are drawn with replacement, the same draw for both (paired), a fixed generator.
    -> (low, high), inf where the curve does not reach the target; None with fewer than 2 seeds."""
    van = {m[0]["seed"]: m for m in van}
    pairs = [(m, van[m[0]["seed"]]) for m in r if m[0]["seed"] in van]
    if len(pairs) < 2:
        return None
    rng, got = np.random.default_rng(0), []
    for _ in range(resamples):
        pick = [pairs[i] for i in rng.integers(len(pairs), size=len(pairs))]
        target = mean_curve([v for _, v in pick], "J")[0][-1]     # as computed for the curves: Vanilla reaches its own
        n = labels_to_reach(mean_curve([m for m, _ in pick], "labels")[0], mean_curve([m for m, _ in pick], "J")[0], target)
        got.append(np.inf if n is None else n)
    return np.quantile(got, 0.025, method="lower"), np.quantile(got, 0.975, method="higher")

def paired(runs, s, k, base="vanilla"):
    """Final `k` of sampler s minus `base`'s, one difference per seed both ran: the same seed draws
    the same prompts (and labels' uniforms) for every sampler, so the spread leaves out what seeds share."""
    van = {m[0]["seed"]: m for m in runs[base]}
    return [m[-1][k] - van[m[0]["seed"]][-1][k] for m in runs[s] if m[0]["seed"] in van]

def paired_cells(runs, s, base="vanilla"):
    """Table cells of sampler s minus `base`, paired by seed: Δ reward, Δ KL, Δ J (mean ± 95% t-interval)."""
    return [ci_text(paired(runs, s, k, base), fmt, "+") for k, fmt in (("reward", ".3f"), ("kl", ".2f"), ("J", ".3f"))]
