"""
The run folder: one process writes it at a time, it holds only what a run writes, and every way a run
can stop before its end is said in one line. What a run writes there:

    <run>/config.json          the run's options (written once, atomically)
    <run>/pairs.jsonl          every labelled pair, appended and flushed as it is given (pairs.Ledger)
    <run>/metrics.jsonl        one line per evaluation, appended and flushed (metrics.Log)
    <run>/checkpoints/<name>/, <run>/checkpoint.json   the latest checkpoint, and the pointer to it (checkpoint.py)
    <run>/policy/, summary.json  the final policy and metrics; summary.json marks a finished run
    <run>/run.lock             held by the process writing the folder; it names that process

Everything written here is written atomically (a temporary file, then os.replace) or appended and
flushed line by line, so a kill at any moment leaves each file whole.
"""
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal
import sys
import time

import ddp
from errors import Stop, UserError, die, leave

LOCK = "run.lock"
POINTER = "checkpoint.json"
# what a run folder may hold: what a run writes (and its temporaries), and compare.py's log of it
RUN_FILES = {"config.json", "pairs.jsonl", "metrics.jsonl", POINTER, "checkpoints", "policy", ".policy",
             "summary.json", LOCK, "train.log"}

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

def read_lines(path):
    """The complete lines of a .jsonl file (a kill in the middle of a write can leave a torn last one)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.readlines()
    return [l for l in lines if l.endswith("\n")]

def lines_hash(path, n):
    """sha256 of the first n lines of a file."""
    h = hashlib.sha256()
    for line in read_lines(path)[:n]:
        h.update(line.encode())
    return h.hexdigest()

# -----------------------------------------------------------------------------
# one writer, in a folder that is a run's

_lock = []      # [run folder, inode of its lock file] while this process holds it

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
        foreign = not_a_run(out, set(vars(args)))
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
        try:
            check(args)
            yield
        except UserError as e:
            die(str(e))
    except (Stop, KeyboardInterrupt, OSError) as e:
        stopped(args, e)
    finally:
        _lock.clear()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if fd is not None:
            if created and set(os.listdir(out)) <= {LOCK}:     # stopped before anything was written: no trace
                os.remove(os.path.join(out, LOCK))
                os.rmdir(out)
            os.close(fd)

def _terminated(signum, frame):
    raise Stop("SIGTERM", 128 + signum)

def not_a_run(out, options):
    """Why `out` is no place for a run, or None: it must be a new or empty folder, or one that holds
    only what a run writes, its config.json a run's (keys among `options`); check() then says whether
    this command may write it."""
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
    if not isinstance(cfg, dict) or set(cfg) - options:
        return "holds a config.json that is not a run's options (a model folder?)"
    return None

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
        leave(f"train.py: stopped: {out} was removed or replaced while this run was writing it -- this run "
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

def check(args):
    """What the folder holds must be what the command expects: a fresh run needs a folder with no
    labels in it (or --overwrite); --resume, an unfinished run with a checkpoint."""
    out = args.out
    finished, has = os.path.exists(os.path.join(out, "summary.json")), len(read_lines(os.path.join(out, "pairs.jsonl")))
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

def fresh(args):
    """A fresh start: the folder's earlier run files go, and config.json records every option. An earlier
    run that bought labels or finished (--overwrite: check() let it through) is moved whole to
    <out>.replaced-N, never deleted; a start that bought nothing is simply replaced."""
    if ddp.rank:
        return
    out = args.out
    old = [f for f in os.listdir(out) if f not in (LOCK, "train.log")]
    if os.path.exists(os.path.join(out, "summary.json")) or read_lines(os.path.join(out, "pairs.jsonl")):
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
    write_json(os.path.join(out, "config.json"), vars(args))

# -----------------------------------------------------------------------------
# every stop in one line

def stopped(args, e):
    """One line for a run that stops before its end, and its exit code. Everything it bought is on
    disk (pairs are flushed as they are labelled), and --resume continues from the last checkpoint."""
    if isinstance(e, OSError):
        where = f"{e.filename}: " if e.filename else ""
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            die(f"cannot write in {args.out} ({where}{e.strerror}) -- make the folder writable, or pass another --out")
        e = Stop(f"the disk holding {os.path.abspath(args.out)} is full ({e.strerror})" if e.errno in (errno.ENOSPC, errno.EDQUOT)
                 else f"{where}{e.strerror}", 1)
    try:
        with open(os.path.join(args.out, POINTER)) as f:
            ck = json.load(f).get("labels")
    except (OSError, ValueError, AttributeError):
        ck = None
    n = len(read_lines(os.path.join(args.out, "pairs.jsonl")))
    again = (f"torchrun --nproc_per_node {ddp.nproc} " if ddp.on else "python ") + f"train.py --resume {args.out}"
    where = (f"{n} labels on disk in {args.out}/pairs.jsonl, the last checkpoint at {ck}" if ck is not None else
             "before the first checkpoint, with no label bought")
    then = f"continue with {again}" if ck is not None else "run the same command again"
    why, code = ("Ctrl-C", 130) if isinstance(e, KeyboardInterrupt) else (e.why, e.code)
    fix = getattr(e, "fix", None) or (f"free some space, then {then}" if why.startswith("the disk") else then)
    line = f"stopped{f' ({why})' if why else ''}: {where} -- {fix}"
    if getattr(e, "on_screen", False):    # a person's q or the end of their input: said on the screen they read
        print("\n" + line)
        sys.exit(code)
    leave("\ntrain.py: " + line, code)
