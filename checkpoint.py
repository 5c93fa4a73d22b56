"""
The run folder: everything a run writes, and what `python train.py --resume <run folder>` needs to
continue a run killed at any moment (SIGKILL included) and end with the same numbers as a run
never stopped.

    <run>/config.json          the run's options (written once, atomically)
    <run>/pairs.jsonl          every labelled pair, appended and flushed as the labeller gives it,
                               before any training on it: labels cost money, so they reach the disk first
    <run>/metrics.jsonl        one line per evaluation, appended and flushed
    <run>/checkpoints/<name>/  policy/ (save_pretrained: safetensors + config), optimizer.pt,
                               rng.pt (torch and generator states)
    <run>/checkpoint.json      which checkpoint is the latest, with the run's counters (Run, below):
                               labels used, steps, prompt order, python RNG state, how many lines of
                               pairs.jsonl and metrics.jsonl it accounts for
    <run>/policy/, summary.json  the final policy and metrics; summary.json marks a finished run

A checkpoint is written aside under a temporary name, renamed into place, and only then named by
checkpoint.json, itself replaced atomically (temporary file, then os.replace). So a kill leaves
either the old checkpoint or the new one, never half of one, and a checkpoint never counts pairs
that are not on disk (they were flushed before the training it saves). A resumed run replays the
rounds after its checkpoint: the sampler draws again, so every generator ends where it would have,
but the pairs already on disk are taken from there instead of being labelled again (on_disk, keep).
Loading never runs foreign code: safetensors for weights, torch.load(weights_only=True) for
tensors, JSON for the rest.

Each function here is one call in train.py; under torchrun rank 0 alone writes.
"""
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import io
import json
import math
import os
import pickle
import random
import shutil
import signal
import sys
import time
from functools import partial

import torch
from tqdm import tqdm

import ddp
import options
import pairs as P
from ddp import die
from oracle import Stop
from sample import NotFinite
from world import WorldError

POINTER = "checkpoint.json"

@dataclasses.dataclass
class Run:
    """A run's counters: what checkpoint.json keeps, and metrics.jsonl reports. The live objects
    (generators, optimizer, open files) are attributes open() adds; they are not fields."""
    round: int = 0              # rounds finished
    labels: int = 0             # labels used so far: the annotation budget
    judged: int = 0             # responses shown to the labeller (two per label; paper Table 1)
    reused: int = 0             # labels a resumed run took from pairs.jsonl instead of buying them again
    steps: int = 0              # DPO steps
    forwards: int = 0           # sampling forwards (paper Table 1)
    score_forwards: int = 0     # extra teacher-forced passes (best_of_n's ranking)
    tokens: int = 0             # tokens of the labelled responses
    sample_s: float = 0.0       # seconds spent sampling
    order: list = dataclasses.field(default_factory=list)       # the shuffled prompt indices still to come
    train_log: list = dataclasses.field(default_factory=list)   # each step's statistics since the last evaluation
    tally: dict = dataclasses.field(default_factory=lambda: dict(answered=0, skipped=0, agreed=0))  # of the pairs so far
    metrics: int = 0            # lines of metrics.jsonl
    last: dict = None           # the last evaluation

# -----------------------------------------------------------------------------
# files: written atomically, or appended and flushed line by line

def write_text(path, text):
    """Atomically: a reader (or a resume after a kill) sees the old file or the new one, whole."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=1))

def write_lines(path, lines):
    """Replace a .jsonl file by these lines, atomically."""
    write_text(path, "".join(lines))

# -----------------------------------------------------------------------------
# the folder's life: one writer, checked under its lock, and every way of stopping in one line

LOCK = "run.lock"   # held (flock) by the process writing the folder; it names that process

class Stopped(Exception):
    """A signal asked the run to stop (SIGTERM; Ctrl-C is Python's KeyboardInterrupt): it ends like a
    kill, with one line."""
    def __init__(self, why, code):
        super().__init__(why)
        self.why, self.code = why, code

def _terminated(signum, frame):
    raise Stopped("SIGTERM", 128 + signum)

@contextlib.contextmanager
def claim(args):
    """The run folder, held by this process for its whole life: an exclusive OS lock on <out>/run.lock
    (rank 0's, under torchrun), which the kernel frees when the process ends, SIGKILL included, so a
    killed run leaves no stale lock. A second train.py on a held folder exits 2 at once, naming the
    process that holds it, and what the folder holds is checked under the lock. Whatever stops the
    run from inside (Ctrl-C, SIGTERM, a labeller that stops, a full disk, a policy gone non-finite)
    ends it like a kill, with one line: the labels on disk and the command that continues it."""
    out, fd = args.out, None
    created = not os.path.exists(out)
    if ddp.rank == 0:
        foreign = not_a_run(out)
        if foreign:
            die(f"--out {out} {foreign} -- a run writes only into a new or empty folder, or one of its own; pass another --out")
        try:
            os.makedirs(out, exist_ok=True)
            fd = os.open(os.path.join(out, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            die(f"--out {out}: cannot write there ({e.strerror}) -- pass a folder you can write to")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            die(f"{out} is being written by {holder} -- wait for it to end, or stop it and continue with --resume {out}")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} (started {time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode(), 0)
        _lock[:] = [out, os.fstat(fd).st_ino]
    signal.signal(signal.SIGTERM, _terminated)
    try:
        check_folder(args)
        yield
    except (Stop, Stopped, KeyboardInterrupt, NotFinite, OSError) as e:
        stopped(args, e)
    finally:
        _lock.clear()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if fd is not None:
            if created and set(os.listdir(out)) <= {LOCK}:     # stopped before anything was written: no trace
                os.remove(os.path.join(out, LOCK))
                os.rmdir(out)
            os.close(fd)

# What a run folder may hold: the files a run writes (and their temporaries), and compare.py's log of it
RUN_FILES = {"config.json", "pairs.jsonl", "metrics.jsonl", POINTER, "checkpoints", "policy", ".policy",
             "summary.json", LOCK, "train.log"}

def not_a_run(out):
    """Why `out` is no place for a run, or None: it must be a new or empty folder, or one that holds
    only what a run writes (then check_folder says whether this command may write it)."""
    if os.path.exists(out) and not os.path.isdir(out):
        return "is a file"
    foreign = sorted(f for f in (os.listdir(out) if os.path.isdir(out) else [])
                     if f not in RUN_FILES and f.removesuffix(".tmp") not in RUN_FILES)
    if foreign:
        return f"holds files that are not a run's ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''})"
    try:
        with open(os.path.join(out, "config.json")) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        cfg = None
    if not isinstance(cfg, dict) or "sampler" not in cfg or set(cfg) - set(options.DEFAULTS):
        return "holds a config.json that is not a run's options (a model folder?)"
    return None

_lock = []      # [run folder, inode of its lock file] while this process holds it

def still_ours():
    """Stop before writing if the folder is no longer the one this process locked: removed, or
    replaced (rm -rf, then another run made it anew) while this run was stopped (SIGSTOP, a laptop lid).
    The other run's files are then never touched."""
    if not _lock:
        return
    out, ino = _lock
    try:
        same = os.stat(os.path.join(out, LOCK)).st_ino == ino
    except OSError:
        same = False
    if not same:
        ddp.leave(f"train.py: stopped: {out} was removed or replaced while this run was writing it -- this run "
                  f"writes nothing more there (what it wrote went with the old folder)", 1)

def _holder(fd):
    """The process holding the lock file `fd`, as it named itself there. A holder names itself just
    after taking the lock, so a run that loses a race may find the file still empty: it waits up to a
    second for the name."""
    for _ in range(20):
        name = os.pread(fd, 200, 0).decode(errors="replace").strip()
        if name:
            return name
        time.sleep(0.05)
    return "another process"

def held_by(out):
    """Who is writing the run folder `out` now (its lock's holder, as it named itself), or None."""
    path = os.path.join(out, LOCK)
    if not os.path.exists(path):
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return _holder(fd)
    finally:
        os.close(fd)

def check_folder(args):
    """What the folder holds must be what the command expects: a fresh run needs a folder with no
    labels in it (or --overwrite); --resume, an unfinished run with a checkpoint."""
    out = args.out
    finished, has = os.path.exists(os.path.join(out, "summary.json")), len(P.read_lines(os.path.join(out, "pairs.jsonl")))
    if args.resume:
        if finished:
            die(f"--resume {out}: that run has finished (summary.json) -- its results are in {out}; start a new one "
                f"with another --out")
        if not os.path.exists(os.path.join(out, POINTER)):
            die(f"--resume {out}: no checkpoint yet: it was stopped while starting, before it bought any label "
                f"-- run its command again, without --resume" if not has else
                f"--resume {out}: it holds {has} labels but no checkpoint.json -- train on them with "
                f"--from_pairs {out}/pairs.jsonl and another --out")
    elif not args.overwrite and finished:
        die(f"{out} holds a finished run (summary.json) -- pass another --out, or --overwrite to replace it")
    elif not args.overwrite and has:
        die(f"{out} already holds a run ({has} labels would be lost) -- pass --resume {out} to continue it, "
            f"another --out, or --overwrite")

def stopped(args, e):
    """One line for a run that stops before its end, and its exit code. Everything it bought is on
    disk (pairs are flushed as they are labelled), and --resume continues from the last checkpoint."""
    if isinstance(e, OSError) and e.errno not in (errno.ENOSPC, errno.EDQUOT):
        raise e
    ck = latest(args.out) if os.path.exists(os.path.join(args.out, POINTER)) else None
    n = len(P.read_lines(os.path.join(args.out, "pairs.jsonl")))
    again = (f"torchrun --nproc_per_node {ddp.nproc} " if ddp.on else "python ") + f"train.py --resume {args.out}"
    where = (f"{n} labels on disk in {args.out}/pairs.jsonl, the last checkpoint at {ck['labels']}" if ck else
             "before the first checkpoint, with no label bought")
    then = f"continue with {again}" if ck else "run the same command again"
    if isinstance(e, OSError):
        ddp.leave(f"train.py: stopped: the disk holding {os.path.abspath(args.out)} is full ({e.strerror}; {where}) "
                  f"-- free some space, then {then}", 1)
    if isinstance(e, NotFinite):
        ddp.leave(f"train.py: stopped: {e} ({where}; no checkpoint holds non-finite weights) -- lower --lr, or start "
                  f"again with another --seed", 1)
    why, code = ("Ctrl-C", 130) if isinstance(e, KeyboardInterrupt) else (e.why, e.code)
    line = f"stopped{f' ({why})' if why else ''}: {where} -- {then}"
    if isinstance(e, Stop):          # a person's q or the end of their input: said on the screen they read
        print("\n" + line)
        sys.exit(code)
    ddp.leave("\ntrain.py: " + line, code)

# -----------------------------------------------------------------------------
# a run: started fresh, or resumed from its last checkpoint

def start(args, w, ck=None):
    """The run's state: a fresh folder with config.json (its earlier run files removed: --overwrite),
    or, from checkpoint `ck`, the counters, generators and optimizer it saved, with the pairs bought
    after it read back to be reused."""
    pairs_path, metrics_path = os.path.join(args.out, "pairs.jsonl"), os.path.join(args.out, "metrics.jsonl")
    if not ck and ddp.rank == 0:
        os.makedirs(args.out, exist_ok=True)
        set_aside(args.out)
        write_json(os.path.join(args.out, "config.json"), vars(args))
    run = Run(**{f.name: ck[f.name] for f in dataclasses.fields(Run)}) if ck else Run()
    run.out, run.t0, run.disk, run.diverged, run.report = args.out, time.time(), [], False, w.labeller.report
    torch.manual_seed(args.seed)
    run.rng = random.Random(args.seed)                                              # prompt order, minibatch order
    run.g_sample = torch.Generator(args.device).manual_seed(ddp.seed(args.seed))    # responses, coin flips
    run.g_label = torch.Generator().manual_seed(ddp.seed(args.seed + 1))            # Bradley-Terry labels
    run.opt = torch.optim.AdamW(w.policy.parameters(), lr=args.lr, weight_decay=0.0)
    run.model = ddp.wrap(w.policy)       # DDP under torchrun: gradients averaged over the ranks in backward()
    # bf16: forwards under autocast, one fresh context per stage. Autocast keeps its bf16 copies of the
    # weights until the outermost context exits, so one context around the whole run would make every
    # forward read the initial weights while AdamW updates the float32 ones: a run that never learns.
    run.amp = partial(torch.autocast, args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    if ck:
        if ck.get("nproc", 1) != ddp.nproc:
            die(f"--resume {args.out}: the run was made with {ck.get('nproc', 1)} processes, this is {ddp.nproc} "
                f"-- resume it with torchrun --nproc_per_node {ck.get('nproc', 1)}" if ck.get("nproc", 1) > 1
                else f"-- resume it with plain python train.py")
        run.t0 -= ck["time"]
        s = ck["python_rng"]
        run.rng.setstate((s[0], tuple(s[1]), s[2]))
        opt, rngs = load_tensors(ck["dir"])
        run.opt.load_state_dict(opt)
        torch.set_rng_state(rngs["torch"])
        run.g_sample.set_state(rngs["sample"][ddp.rank])
        run.g_label.set_state(rngs["label"][ddp.rank])
        # metrics after the checkpoint are made again, identically; pairs after it are reused as they are.
        # Both files must hold what the checkpoint accounts for, the pairs unchanged (their hash)
        lines, metrics = P.read_lines(pairs_path), P.read_lines(metrics_path)
        damaged = (f"pairs.jsonl holds {len(lines)} pairs, fewer than its checkpoint's {ck['labels']}"
                   if len(lines) < ck["labels"] else
                   f"metrics.jsonl holds {len(metrics)} evaluations, fewer than its checkpoint's {ck['metrics']}"
                   if len(metrics) < ck["metrics"] else
                   f"the first {ck['labels']} lines of pairs.jsonl are not the ones its checkpoint counted"
                   if ck.get("pairs_sha256") not in (None, lines_hash(pairs_path, ck["labels"])) else None)
        if damaged:
            die(f"--resume {args.out}: {damaged} -- the folder was changed since; train on its labels with "
                f"--from_pairs {pairs_path} and another --out")
        if ddp.rank == 0:
            write_lines(metrics_path, metrics[:ck["metrics"]])
            write_lines(pairs_path, lines)   # without a torn last line, if the kill left one
        try:
            run.disk = P.read(pairs_path, w.policy.config.vocab_size)
        except WorldError as e:
            die(str(e))
        if ddp.rank == 0:
            print(f"resuming {args.out} at {ck['labels']} labels; {len(lines) - ck['labels']} labels bought after that "
                  f"checkpoint are reused, not bought again")
    if ddp.rank == 0:
        run.pairs_f, run.metrics_f = open(pairs_path, "a"), open(metrics_path, "a")
    # no bar on other ranks, nor where a person reads the pairs in this terminal; otherwise tqdm decides
    # (TQDM_DISABLE=1 turns it off: a `disable` passed here would override that)
    quiet = dict(disable=True) if ddp.rank > 0 or w.labeller.terminal else {}
    run.bar = tqdm(total=args.labels, initial=run.labels, desc=f"{args.sampler}/{args.mode}", unit="label", **quiet)
    return run

def set_aside(out):
    """A fresh start in a folder that holds a run (--overwrite: check_folder let it through): the old
    run's files are moved to <out>.replaced-N, never deleted, when it bought labels or finished; a
    start that bought nothing (config, the first evaluation and checkpoint) is simply replaced."""
    old = [f for f in os.listdir(out) if f not in (LOCK, "train.log")]
    if os.path.exists(os.path.join(out, "summary.json")) or P.read_lines(os.path.join(out, "pairs.jsonl")):
        k = 1
        while os.path.exists(f"{out}.replaced-{k}"):
            k += 1
        os.makedirs(f"{out}.replaced-{k}")
        for f in old:
            os.rename(os.path.join(out, f), os.path.join(f"{out}.replaced-{k}", f))
        print(f"note: --overwrite: the run that was in {out} is kept in {out}.replaced-{k}")
    for f in old:
        path = os.path.join(out, f)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)

def spent(run, out, seconds):
    """A batch's sampling cost, counted for metrics.jsonl: forwards (paper Table 1), extra scoring
    passes, response tokens, each summed over the ranks; and this rank's seconds."""
    cost = ddp.total([out["forwards"], out["score_forwards"], int(out["a_mask"].sum() + out["b_mask"].sum())])
    run.forwards, run.score_forwards, run.tokens = (x + int(c) for x, c in zip((run.forwards, run.score_forwards, run.tokens), cost))
    run.sample_s += seconds

def on_disk(run, first, texts, a, b):
    """The pairs of this share of a batch (its first at the run's index `first`) that a resumed run
    bought before it was killed: taken from pairs.jsonl, never labelled again. The sampler replayed
    them; where its samples differ from the saved ones (sampling is not bit-exact on a GPU) the saved
    pairs are used as they are, with a note; a saved pair of another prompt means a damaged file,
    and exits 2. Empty in a run never stopped."""
    saved = run.disk[first:first + len(texts)]
    for j, d in enumerate(saved):
        if d.prompt != texts[j]:      # the prompts are drawn by Python's RNG, exactly the same on any machine
            die(f"--resume {run.out}: pairs.jsonl line {first + j + 1} is not the pair this run drew there (another "
                f"prompt) -- a line was removed or edited; train on its labels with --from_pairs and another --out")
        if sorted([d.chosen_ids, d.rejected_ids]) != sorted([a[j].ids, b[j].ids]):
            if not run.diverged and ddp.rank == 0:
                print(f"note: the replayed samples differ from {run.out}/pairs.jsonl at label {first + j} "
                      f"(sampling is not bit-reproducible here); its saved labels are used as they are")
            run.diverged = True
    return saved

def keep(run, saved, new):
    """A batch's pairs: this share's `saved` ones (on_disk), then the `new` ones, each appended to
    pairs.jsonl and flushed as the labeller gives it (a person's answer is never lost), before any
    training on it. Under torchrun the ranks' shares are gathered in prompt order and rank 0 writes
    the new ones. Counts the labels, the reused ones and the tally. -> the whole batch"""
    mine = list(saved)
    for p in new:
        mine.append(p)
        if not ddp.on:
            append(run, [p])
    batch = ddp.gather(mine)
    k = min(len(batch), max(0, len(run.disk) - run.labels))          # of the batch, pairs that were on disk
    if ddp.on and ddp.rank == 0:
        append(run, batch[k:])
    count(run, batch, k)
    return batch

def append(run, pairs):
    still_ours()
    run.pairs_f.write("".join(P.line(p) for p in pairs))
    run.pairs_f.flush()

def count(run, batch, reused):
    """The batch's labels (paper Table 1: two responses judged per label) and what the labeller said."""
    run.labels, run.judged, run.reused = run.labels + len(batch), run.judged + 2 * len(batch), run.reused + reused
    answered = [p for p in batch if not p.skipped]
    run.tally = dict(answered=run.tally["answered"] + len(answered), skipped=run.tally["skipped"] + len(batch) - len(answered),
                     agreed=run.tally["agreed"] + sum(p.chosen_score > p.rejected_score for p in answered))
    run.bar.update(len(batch))

def reread(run, source, n, batch_size):
    """--from_pairs: the next n pairs of the source file, in their order, instead of collect's sampling
    and labelling (nothing is bought); written to this run's pairs.jsonl as collect writes its own."""
    got = []
    for i in range(0, n, batch_size):
        batch = [dataclasses.replace(p, round=run.round, step=run.steps)
                 for p in source[run.labels:run.labels + min(batch_size, n - i)]]
        k = min(len(batch), max(0, len(run.disk) - run.labels))
        batch[:k] = run.disk[run.labels:run.labels + k]
        if ddp.rank == 0:
            append(run, batch[k:])
        count(run, batch, k)
        got += batch
    return got

def log(run, m):
    """An evaluation, with the counters and the training statistics since the last one, appended to
    metrics.jsonl and printed."""
    m.update(step=run.steps, labels=run.labels, reused=run.reused, forwards=run.forwards,
             fwd_per_pair=run.forwards / max(run.labels, 1), score_fwd_per_pair=run.score_forwards / max(run.labels, 1),
             judged_per_label=run.judged / max(run.labels, 1),
             tok_per_s=run.tokens / max(run.sample_s, 1e-9), time=time.time() - run.t0)
    if run.train_log:
        m.update({k: sum(x[k] for x in run.train_log) / len(run.train_log) for k in run.train_log[0]})
        run.train_log.clear()
    m.update(run.report(run.tally))
    run.metrics += 1
    run.last = m
    if ddp.rank:
        return
    still_ours()
    run.metrics_f.write(json.dumps(m) + "\n")
    run.metrics_f.flush()
    tqdm.write(f"step {m['step']:4d} | labels {m['labels']:5d} | reward {m['reward']:6.3f} | KL {m['kl']:6.2f} | "
               f"J {m['J']:6.3f} | acc {m.get('acc', float('nan')):.2f} | len {m['len']:5.1f} | {m['time']:5.0f}s")
    if m.get("answered"):
        tqdm.write(f"you answered {m['answered']} pairs and skipped {m['skipped']}; the judge agreed with "
                   f"{m['agree']:.0%} of your answers")

def save(run, w):
    """A checkpoint: everything the next round depends on, and a hash of the pairs.jsonl lines it
    accounts for, so that a resume can tell a damaged file. A policy whose weights are not finite is
    never saved: the last good checkpoint stays the latest."""
    if not torch.isfinite(torch.nn.utils.get_total_norm(list(w.policy.parameters()))):
        raise NotFinite("the policy's weights are not finite (or overflow) after the last DPO step")
    state = dict(dataclasses.asdict(run), time=time.time() - run.t0, python_rng=run.rng.getstate(), nproc=ddp.nproc)
    gens = ddp.everyone((run.g_sample.get_state(), run.g_label.get_state()))       # one pair per rank
    if ddp.rank:
        return
    still_ours()
    state["pairs_sha256"] = lines_hash(os.path.join(run.out, "pairs.jsonl"), run.labels)
    rngs = dict(torch=torch.get_rng_state(), sample=[s for s, _ in gens], label=[l for _, l in gens])
    name = f"labels-{run.labels:07d}"
    root = os.path.join(run.out, "checkpoints")
    tmp, final = os.path.join(root, "." + name), os.path.join(root, name)
    for d in (tmp, final):            # left over from a life that was killed before naming it
        shutil.rmtree(d, ignore_errors=True)
    os.makedirs(tmp)
    w.policy.save_pretrained(os.path.join(tmp, "policy"))   # safetensors, loadable as --init_from too
    w.tok.save_pretrained(os.path.join(tmp, "policy"))
    for f, obj in (("optimizer.pt", run.opt.state_dict()), ("rng.pt", rngs)):
        buf = io.BytesIO()            # serialised in memory, written by us: a full disk is a plain OSError
        torch.save(obj, buf)
        with open(os.path.join(tmp, f), "wb") as fh:
            fh.write(buf.getvalue())
    os.replace(tmp, final)
    write_json(os.path.join(run.out, POINTER), dict(state, dir=os.path.join("checkpoints", name)))
    for d in os.listdir(root):        # only now is the older checkpoint no longer needed
        if d != name:
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)

def lines_hash(path, n):
    """sha256 of the first n lines of a file."""
    h = hashlib.sha256()
    for line in P.read_lines(path)[:n]:
        h.update(line.encode())
    return h.hexdigest()

def latest(out):
    """The latest checkpoint's counters (with 'dir', its folder, and 'policy'), or None if the run has
    none. A damaged checkpoint.json or a missing checkpoint folder exits 2 with one line."""
    path = os.path.join(out, POINTER)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            state = json.load(f)
        missing = [k for k in [f.name for f in dataclasses.fields(Run)] + ["time", "python_rng", "nproc", "dir"]
                   if k not in state]
        if missing:
            raise ValueError(f"no '{missing[0]}'")
    except (ValueError, TypeError) as e:
        die(f"{path} is damaged ({e}) -- the run cannot continue from it; train on its labels with "
            f"--from_pairs {out}/pairs.jsonl and another --out")
    state["dir"] = os.path.join(out, state["dir"])
    state["policy"] = os.path.join(state["dir"], "policy")
    for f in ("policy/config.json", "optimizer.pt", "rng.pt"):
        if not os.path.exists(os.path.join(state["dir"], f)):
            die(f"{path} names {state['dir']}, which has no {f} -- the checkpoint was removed or moved; train on the "
                f"run's labels with --from_pairs {out}/pairs.jsonl and another --out")
    return state

def load_tensors(ckpt_dir):
    """Optimizer and RNG states of a checkpoint, read without running any pickled code."""
    got = []
    for f in ("optimizer.pt", "rng.pt"):
        try:
            got.append(torch.load(os.path.join(ckpt_dir, f), weights_only=True))
        except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
            die(f"{os.path.join(ckpt_dir, f)} holds something other than tensors ({str(e).splitlines()[0][:80]}) and is "
                f"not read -- it was not written by train.py; start the run again with --overwrite")
    return got

def finite_or_stop(run, loss, norm):
    """A non-finite loss or gradient norm stops the run before the step: one line, nothing more
    written, the last good checkpoint kept (the same on every rank: the statistics are reduced)."""
    why = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {norm.item()}" \
        if not torch.isfinite(norm) else None
    if why:
        ck = latest(run.out)
        ddp.leave(f"train.py: stopped at step {run.steps + 1}: {why} -- the last good checkpoint ({ck['labels']} labels, "
                  f"{ck['dir']}) is kept, with every label bought since; lower --lr, or start again with another --seed", 1)

def finish(run, w):
    """The final policy, then summary.json, whose presence marks a finished run (both atomic)."""
    run.bar.close()
    if ddp.rank:
        return
    still_ours()
    tmp = os.path.join(run.out, ".policy")
    shutil.rmtree(tmp, ignore_errors=True)
    w.policy.save_pretrained(tmp)
    w.tok.save_pretrained(tmp)
    shutil.rmtree(os.path.join(run.out, "policy"), ignore_errors=True)
    os.replace(tmp, os.path.join(run.out, "policy"))
    write_json(os.path.join(run.out, "summary.json"), run.last)
    run.pairs_f.close()
    run.metrics_f.close()
    print(f"the run is in {run.out}/: summary.json, metrics.jsonl, pairs.jsonl, policy/")
