"""
The comparison (paper Sec. 6, Table 2, Figures 2-3): every pair sampler, several seeds, one mode,
identical budgets, in one command; then a table and two figures drawn from the run folders.

    python compare.py --mode iterative                        # 4 samplers x 3 seeds -> out/compare-iterative/
    python compare.py --mode online -- --labels 256           # anything after -- goes to every train.py run
    python compare.py --mode online --out out/robust -- --init_from out/overfit/policy
    python compare.py --mode iterative --only_report          # just read the finished runs again
    python compare.py --seeds 0-9 --grid loss=dpo,ipo reference=initial,behavior   # more axes: a folder per point

Each run is `python train.py --sampler S --mode M --seed X --out <out>/S-sX <args after -->`, one
subprocess each, so a crash stays contained (its output goes to <out>/S-sX/train.log). A run folder
with summary.json is finished and never recomputed; one without it was interrupted: it continues from
its last checkpoint (train.py --resume, its labels reused), or, with no checkpoint yet, is moved aside
to <run>.interrupted-N (its labels were paid for) and run again. Runs made with another budget,
finished or not, are refused ("mismatched budgets"): a comparison is only fair when every sampler gets
the same labels, steps, learning rate and beta, and the same policy, oracle and prompts.

Writes <out>/results.md, <out>/reward_kl.png and <out>/j_labels.png (report.py: Table 2's shape with
intervals over seeds, paired differences, Table 1's costs, labels to reach Vanilla's final J).

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
from functools import partial
from types import SimpleNamespace

from tqdm import tqdm

import errors
import folder   # a run folder's lock: a run another process is writing is left alone
import options   # train.py's command line: each run's full config (defaults included), and its checks
import pilaf
from pilaf import SAMPLERS
from report import grid_report, load_runs, run_dir, write_report

HERE = os.path.dirname(os.path.abspath(__file__))
# A comparison is fair when every run in a folder agrees on every train.py option that can
# change a result: all of them (a new option is counted the day it is added), except these.
NOT_BUDGET = ("sampler", "seed",                # the comparison's own axes
              "out", "overwrite", "resume",      # where a run is written, and how it is started
              "world",                           # where the world is cached (the policy, oracle and prompts are compared)
              "device",                          # cpu or cuda
              "save_every", "keep_checkpoints")  # checkpoints: a resumed run ends as one never stopped

def budget_keys():
    return [k for k in options.defaults() if k not in NOT_BUDGET]
WORLD_PARTS = ("policy", "oracle", "prompts")   # None: the embedded world's, as train.py resolves them
RESERVED = ["--sampler", "--mode", "--seed", "--out", "--overwrite", "--resume"]   # compare.py sets these per run

die = partial(errors.die, prog="compare.py")   # bad input: one line naming the fix, exit code 2

def get_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)   # after "--": train.py's own arguments
    argv, extra = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(description="Run every sampler for several seeds with one budget; tabulate and plot.",
                                formatter_class=options.Help,
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
        if key not in options.defaults():
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

def absolute(argv):
    """train.py arguments with every path made absolute, so that the command runs from anywhere."""
    folders = {"--out", "--resume", "--world"}                                    # made if missing
    names = {"--policy", "--oracle", "--judge", "--prompts", "--init_from", "--from_pairs"}   # or a hub name
    return [os.path.abspath(a) if i and (argv[i - 1] in folders or argv[i - 1] in names and os.path.exists(a)) else a
            for i, a in enumerate(argv)]

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
                    have = resolved(dict(options.defaults(), **json.load(f)))
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
            holder = folder.held_by(d)
            if holder:
                print(f"note: {d} is being written by {holder}: left alone", file=sys.stderr)
                continue
            if os.path.exists(os.path.join(d, folder.POINTER)):
                argv = ["--resume", d]
            else:
                if len(folder.read_lines(os.path.join(d, "pairs.jsonl"))):
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
                    last = (folder.read_lines(os.path.join(d, "train.log")) or ["(no output)\n"])[-1].strip()
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
