"""
The comparison (paper Sec. 6, Table 2, Figures 2-3): every pair sampler, several seeds, one mode,
identical budgets, in one command; then a table and two figures drawn from the run folders.

    python compare.py --mode iterative                        # 4 samplers x 3 seeds -> out/compare-iterative/
    python compare.py --mode online -- --labels 256           # anything after -- goes to every train.py run
    python compare.py --mode online --out out/robust -- --init_from out/overfit/policy
    python compare.py --mode iterative --only_report          # just read the finished runs again
    python compare.py --seeds 0-9 --grid loss=dpo,ipo reference=initial,behavior   # more axes: a folder per point

Each run is `python train.py --sampler S --mode M --seed X --out <out>/S-sX <args after -->`, one
subprocess each, so a crash stays contained (its output goes to <out>/logs/S-sX.log). A run folder
with summary.json is finished and never recomputed; one without it was interrupted: it continues from
its last checkpoint (train.py --resume, its labels reused), or, with no checkpoint yet, is moved aside
to <run>.interrupted-N (its labels were paid for) and run again. Finished runs made with another
budget are refused ("mismatched budgets"): a comparison is only fair when every sampler gets the same labels, steps, learning rate and beta,
and the same policy, oracle and prompts.

Writes <out>/results.md (Table 2's shape: final reward, KL and J = reward - beta*KL, mean +- a 95%
t-interval over seeds; each sampler minus Vanilla, paired by seed; Table 1's costs: labels, responses
judged per label, sampling forwards per pair; and the labels each sampler needed to reach Vanilla's
final J, with a bootstrap interval over seeds), <out>/reward_kl.png (reward vs KL, Figures 2-3) and
<out>/j_labels.png (J vs labels: annotation efficiency).

--grid adds axes beyond sampler and seed: any train.py option, each with a list of values. Every
combination gets its own folder <out>/<key>-<value>_... holding the runs, report and figures above,
and <out>/results.md gathers them in one table (each point's J and its paired difference to Vanilla).
"""
import omp  # noqa: F401  (first: how the CPU threads wait, set before torch loads; omp.py says why)

import argparse
import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from tqdm import tqdm

import checkpoint   # a run folder's lock: a run another process is writing is left alone
import options   # train.py's command line: each run's full config (defaults included), and its checks
import pairs as P
import pilaf
from pilaf import SAMPLERS

HERE = os.path.dirname(os.path.abspath(__file__))
# A comparison is fair when every finished run in a folder agrees on every train.py option that can
# change a result: all of them (a new option is counted the day it is added), except these.
NOT_BUDGET = ("sampler", "seed",                # the comparison's own axes
              "out", "overwrite", "resume",      # where a run is written, and how it is started
              "world",                           # where the world is cached (the policy, oracle and prompts are compared)
              "device",                          # cpu or cuda
              "save_every")                      # checkpoints: a resumed run ends as one never stopped

def budget_keys():
    return [a.dest for a in options.parser()._actions if a.dest not in NOT_BUDGET + ("help",)]
WORLD_PARTS = ("policy", "oracle", "prompts")   # None: the embedded world's, as train.py resolves them
RESERVED = ["--sampler", "--mode", "--seed", "--out", "--overwrite", "--resume"]   # compare.py sets these per run
NAMES = {"vanilla": "Vanilla", "best_of_n": "Best-of-N", "hybrid": "Hybrid", "pilaf": "PILAF", "t_pilaf": "T-PILAF"}
COLORS = {"vanilla": "tab:gray", "best_of_n": "tab:blue", "hybrid": "tab:green", "pilaf": "tab:red", "t_pilaf": "tab:purple"}

def die(msg):
    """Bad input: one line, exit code 2 (like train.py and argparse)."""
    print(f"compare.py: error: {msg}", file=sys.stderr)
    sys.exit(2)

def get_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)   # after "--": train.py's own arguments
    argv, extra = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(description="Run every sampler for several seeds with one budget; tabulate and plot.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="Arguments after -- are passed to every train.py run, e.g. -- --labels 256")
    p.error = die
    p.add_argument("--mode", default="online", choices=["online", "iterative"], help="online or iterative DPO")
    p.add_argument("--samplers", nargs="+", default=["vanilla", "best_of_n", "hybrid", "pilaf"], choices=list(SAMPLERS),
                   metavar="NAME", help=f"pair samplers to compare, from {list(SAMPLERS)}")
    p.add_argument("--seeds", nargs="+", default=["0-2"], help="one run per sampler per seed: seeds and ranges, e.g. 0-9 or 0 1 5-7")
    p.add_argument("--grid", nargs="+", default=[], metavar="KEY=V1,V2",
                   help="more axes: train.py options with their values, e.g. loss=dpo,ipo reference=initial,behavior")
    p.add_argument("--out", default=None, help="root folder of the runs; None: out/compare-<mode>")
    p.add_argument("--only_report", action="store_true", help="train nothing: read the finished runs, write the report")
    p.add_argument("--jobs", type=int, default=1, help="train.py runs at a time on this machine (each on one thread, "
                                                     "unless OMP_NUM_THREADS is set)")
    p.add_argument("--commands", action="store_true", help="train nothing: print the train.py command of every missing "
                                                           "or unfinished run, one a line, for GNU parallel or a job array")
    args = p.parse_args(argv)
    if args.jobs < 1:
        die(f"--jobs must be at least 1 (got {args.jobs})")
    if args.commands and (args.jobs != 1 or args.only_report):
        die("--commands prints the runs' commands for another launcher and trains nothing -- leave out "
            + ("--jobs" if args.jobs != 1 else "--only_report"))
    args.seeds = parse_seeds(args.seeds)
    args.grid = parse_grid(args.grid)
    args.extra = extra
    args.out = args.out or os.path.join("out", f"compare-{args.mode}")
    for a in extra:
        if a.split("=")[0] in RESERVED:
            die(f"{a.split('=')[0]} after -- is set by compare.py; use compare.py's own --mode / --samplers / --seeds / --out")
        if a.split("=")[0].lstrip("-") in dict(args.grid):
            die(f"{a.split('=')[0]} is both a --grid axis and fixed after -- ; keep one")
    return args

OPTIONS = {a.dest for a in options.parser()._actions if a.dest != "help"}   # what a --grid axis can be

def parse_grid(tokens):
    """['loss=dpo,ipo', 'reference=initial,behavior'] -> [('loss', ['dpo', 'ipo']), ('reference', [...])];
    bad input exits 2 in one line (bad values: train.py's own check, before any run starts)."""
    axes = []
    for t in tokens:
        key, eq, vals = t.partition("=")
        key = key.lstrip("-")
        if key in ("sampler", "seed"):
            die(f"--grid {key}: samplers and seeds are axes already -- use compare.py's --{key}s")
        if "--" + key in RESERVED:
            die(f"--grid {key}: compare.py sets --{key} itself -- leave it out of the grid (one compare.py per --mode)")
        if key not in OPTIONS:
            die(f"--grid: train.py has no option --{key} (see python train.py --help)")
        if not eq or "" in vals.split(","):
            die(f"--grid: '{t}' is not KEY=V1,V2,... (e.g. loss=dpo,ipo)")
        if key in dict(axes):
            die(f"--grid: {key} is given twice -- list all its values once, {key}=V1,V2")
        axes.append((key, vals.split(",")))
    return axes

def points(args):
    """One comparison per combination of the grid's values, each in its own folder with its values
    passed to every train.py run; without --grid, the one comparison in --out."""
    out = []
    for combo in itertools.product(*[[(k, v) for v in vals] for k, vals in args.grid]):
        name = "_".join(f"{k}-{v}" for k, v in combo).replace(os.sep, "+")
        out.append(SimpleNamespace(**dict(vars(args), out=os.path.join(args.out, name) if combo else args.out,
                                          extra=args.extra + [x for k, v in combo for x in (f"--{k}", v)]),
                                   point=dict(combo)))
    return out

def parse_seeds(tokens):
    """['0-2', '7'] -> [0, 1, 2, 7]; bad input exits 2 in one line."""
    seeds = []
    for t in tokens:
        lo, dash, hi = t.partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()) or (hi and int(hi) < int(lo)):
            die(f"--seeds: '{t}' is neither a seed nor a range like 0-9")
        seeds += range(int(lo), int(hi or lo) + 1)
    return list(dict.fromkeys(seeds))   # each seed once, in the order given

def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]

def absolute(argv):
    """train.py arguments with every path made absolute, so that the command runs from anywhere."""
    folders = {"--out", "--resume", "--world"}                                    # made if missing
    names = {"--policy", "--oracle", "--judge", "--prompts", "--init_from", "--from_pairs"}   # or a hub name
    return [os.path.abspath(a) if i and (argv[i - 1] in folders or argv[i - 1] in names and os.path.exists(a)) else a
            for i, a in enumerate(argv)]

def run_dir(out, sampler, seed):
    return os.path.join(out, f"{sampler}-s{seed}")

def train_argv(args, sampler, seed):
    """The train.py arguments of one run of the comparison; a sampler's own option (--n) goes only to
    the samplers that take it."""
    others = {f"--{k}" for k in options.sampler_options() if k not in pilaf.options(sampler)}
    extra, skip = [], False
    for a in args.extra:
        if skip or a.split("=")[0] in others:
            skip = not skip and "=" not in a and a in others       # its value follows
            continue
        extra.append(a)
    return [*extra, "--sampler", sampler, "--mode", args.mode, "--seed", str(seed), "--out", run_dir(args.out, sampler, seed)]

def resolved(cfg):
    """A run's config with --policy / --oracle / --prompts None replaced by the embedded world's folders,
    as train.py does before it writes config.json (so a default run compares equal to its own config)."""
    return dict(cfg, **{k: cfg.get(k) or os.path.join(cfg["world"], k) for k in WORLD_PARTS if cfg.get("world")})

DEFAULTS = {a.dest: a.default for a in options.parser()._actions if a.dest != "help"}   # train.py's defaults

def check_budgets(args):
    """Refuse before any work if the runs already in the folders, finished or not, disagree with each
    other or with this command.
    -> the config the comparison uses (None if --only_report finds no finished run)"""
    want = None
    for s in args.samplers:
        for seed in args.seeds:
            d = run_dir(args.out, s, seed)
            if not args.only_report:
                want = resolved(vars(options.get_args(train_argv(args, s, seed) + ["--overwrite"])))
            finished = os.path.exists(os.path.join(d, "summary.json"))
            # a finished run is reported, an unfinished one continued: each must be a run of this comparison
            if not finished and (args.only_report or not os.path.exists(os.path.join(d, "config.json"))):
                continue
            try:
                with open(os.path.join(d, "config.json")) as f:   # an option newer than the run: it ran with the default
                    have = resolved(dict(DEFAULTS, **json.load(f)))
            except (ValueError, TypeError) as e:
                die(f"{d}/config.json is damaged ({e}) -- move the folder aside, or pass another --out")
            want = want or have     # --only_report: the first finished run sets the budget
            online = want.get("mode") == "online"   # online DPO has no iterations and one pass: those keys do not matter
            diff = [k for k in budget_keys() if have.get(k) != want.get(k) and not (online and k in ("iterations", "epochs"))]
            if diff:
                die(f"mismatched budgets: {d} was {'run' if finished else 'started (unfinished)'} with " +
                    ", ".join(f"{k}={have.get(k)!r}" for k in diff) +
                    " but this comparison uses " + ", ".join(f"{k}={want.get(k)!r}" for k in diff) +
                    " -- pass the same arguments after --, or another --out")
    return want

def pending(args):
    """The runs of a point still to train, each as (name, folder, train.py arguments): a run with a
    checkpoint continues (--resume, its labels reused), one stopped before its first checkpoint with
    labels on disk is moved aside to <run>.interrupted-N (they were paid for) and runs again. A run
    another process is writing (its folder's lock is held) is left alone, with a note."""
    todo = []
    for seed in args.seeds:
        for s in args.samplers:
            name, d = f"{s}-s{seed}", run_dir(args.out, s, seed)
            if os.path.exists(os.path.join(d, "summary.json")):
                continue
            holder = checkpoint.held_by(d)
            if holder:
                print(f"note: {d} is being written by {holder}: left alone", file=sys.stderr)
                continue
            if os.path.exists(os.path.join(d, checkpoint.POINTER)):
                argv = ["--resume", d]
            else:
                if len(P.read_lines(os.path.join(d, "pairs.jsonl"))):
                    k = 1
                    while os.path.exists(f"{d}.interrupted-{k}"):
                        k += 1
                    os.rename(d, f"{d}.interrupted-{k}")
                argv = train_argv(args, s, seed)
            todo.append((os.path.join(os.path.basename(args.out), name) if args.point else name, d, argv))
    return todo

def interrupted(signum, frame):
    raise KeyboardInterrupt          # SIGTERM stops the comparison as Ctrl-C does

def run_all(todo, jobs):
    """Train `todo` (pending's runs), `jobs` train.py subprocesses at a time, each on one thread unless
    OMP_NUM_THREADS is set, its output in <run>/train.log. A run that fails is named with the last line
    of its log, and the others go on. Ctrl-C (or SIGTERM) stops every run like a kill, and the same
    command continues them. -> names of the runs that failed"""
    env = dict(os.environ, TQDM_DISABLE="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    failed, running, left = [], {}, list(todo)
    bar = tqdm(total=len(todo), desc="compare", unit="run", disable=not todo)
    signal.signal(signal.SIGTERM, interrupted)
    try:
        while left or running:
            while left and len(running) < jobs:
                name, d, argv = left.pop(0)
                os.makedirs(d, exist_ok=True)
                log = open(os.path.join(d, "train.log"), "a")
                p = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"), *argv], stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
                running[p] = (name, d, log)
            bar.set_postfix_str(f"{len(running)} running, {len(left)} left")
            time.sleep(0.2)
            for p in [p for p in running if p.poll() is not None]:
                name, d, log = running.pop(p)
                log.close()
                bar.update(1)
                if p.returncode:
                    failed.append(name)
                    last = (P.read_lines(os.path.join(d, "train.log")) or ["(no output)\n"])[-1].strip()
                    tqdm.write(f"{name} failed (exit {p.returncode}): {last} -- see {d}/train.log")
    except KeyboardInterrupt:
        for p in running:
            p.send_signal(signal.SIGINT)             # each stops like a kill: its labels on disk, resumable
        for p in running:
            p.wait()
        bar.close()
        print(f"compare.py: stopped (Ctrl-C): {len(running)} runs stopped like a kill, {len(left)} not started -- "
              f"run the same command again to continue them", file=sys.stderr)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    bar.close()
    return failed

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

def report(runs, beta=0.1):
    """results.md: the paper's Table 2 (final reward, KL, J: mean +- 95% t-interval over seeds), the
    same paired with Vanilla by seed, Table 1's costs, and the labels each sampler needed to reach
    Vanilla's final mean J."""
    final = {s: {k: mean_ci([m[-1][k] for m in r]) for k in ("reward", "kl", "J", "labels", "judged_per_label",
                                                            "fwd_per_pair", "score_fwd_per_pair")} for s, r in runs.items()}
    best = {"reward": max(final, key=lambda s: final[s]["reward"][0]), "kl": min(final, key=lambda s: final[s]["kl"][0]),
            "J": max(final, key=lambda s: final[s]["J"][0])}
    def cell(s, k, fmt):
        m, h = final[s][k]
        txt = f"{m:{fmt}} ± {h:{fmt}}"
        return f"**{txt}**" if best.get(k) == s and len(final) > 1 else txt
    lines = ["| Sampler | seeds | reward ↑ | KL ↓ | J = reward − β·KL ↑ | labels | judged / label | sampling fwd / pair |",
             "|---|---|---|---|---|---|---|---|"]
    for s, r in runs.items():
        f = final[s]
        fwd = f"{f['fwd_per_pair'][0]:.2f}" + (f" (+{f['score_fwd_per_pair'][0]:.0f} scoring)" if f["score_fwd_per_pair"][0] else "")
        lines.append(f"| {NAMES.get(s, s)} | {len(r)} | {cell(s, 'reward', '.3f')} | {cell(s, 'kl', '.2f')} | "
                     f"{cell(s, 'J', '.3f')} | {f['labels'][0]:.0f} | {f['judged_per_label'][0]:.0f} | {fwd} |")
    lines += ["", f"Final evaluation, mean ± 95% t-interval over seeds (nan for one seed); β = {beta}. Paper Table 1 "
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
        lines += ["", "## What PILAF's two roundings cost: T-PILAF − PILAF, paired by seed, at equal labels", "",
                  "T-PILAF draws the theory's pairs (sequence-level π±, mixture weight Z₊Z₋/(1+Z₊Z₋)); PILAF rounds both "
                  "(token-level π±, weight ½).", "", "| seeds | Δ reward | Δ KL | Δ J |", "|---|---|---|---|",
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
    """J vs labels used (mean +- std over seeds): annotation efficiency. Dashed: Vanilla's final J."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for s, r in runs.items():
        x, (m, sd) = mean_curve(r, "labels")[0], mean_curve(r, "J")
        ax.plot(x, m, "o-", ms=3, color=COLORS.get(s), label=NAMES.get(s, s))
        ax.fill_between(x, m - sd, m + sd, color=COLORS.get(s), alpha=0.15, lw=0)
    if "vanilla" in runs:
        ax.axhline(mean_curve(runs["vanilla"], "J")[0][-1], ls="--", color=COLORS["vanilla"], lw=0.8)
    ax.set(xlabel="preference labels used", ylabel="J = reward − β·KL", title="J vs labels (mean ± std over seeds)")
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

def main(argv=None):
    args = get_args(argv)
    pts = points(args)
    cfgs = [check_budgets(p) for p in pts]       # every point checked before any run starts
    if args.commands:
        for p in pts:
            for _, _, argv in pending(p):
                print(shlex.join(["cd", HERE]) + " && " + shlex.join([sys.executable, "train.py", *absolute(argv)]))
        return []
    failed = [] if args.only_report else run_all([run for p in pts for run in pending(p)], args.jobs)
    done = []
    for p, cfg in zip(pts, cfgs):
        runs = load_runs(p.out, p.samplers, p.seeds)
        if runs:    # (with --only_report, cfg is that of the point's first finished run)
            text = write_report(p, runs, cfg)
            done.append((p, runs, cfg))
    if not done:
        die(f"no finished runs under {args.out} -- " + (f"every run failed, see the logs under {args.out}" if failed
                                                        else "run without --only_report first"))
    if min(len(m) for _, runs, _ in done for r in runs.values() for m in r) <= 2:
        print("compare.py: note: the runs have only two evaluations each (at the start and the end): their curves are "
              "two-point lines -- pass -- --eval_every smaller for more", file=sys.stderr)
    if args.grid:
        text = grid_report(done)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(f"# {args.mode} DPO over {' × '.join(k for k, _ in args.grid)} ({args.out})\n\n" + text)
        print(text + f"\nwrote {args.out}/results.md, and results.md, reward_kl.png, j_labels.png in each point's folder")
    else:
        print(text + f"\nwrote {args.out}/results.md, reward_kl.png, j_labels.png")
    if failed:
        print(f"compare.py: {len(failed)} run(s) failed: {' '.join(failed)} (logs under {args.out})", file=sys.stderr)
        sys.exit(1)
    return done

if __name__ == "__main__":
    main()
