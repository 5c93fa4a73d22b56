"""
Does this checkout train exactly as an earlier commit did? For a change that only re-arranges code
(a re-cut, a rename): the same command in both trees must write byte-identical pairs.jsonl, the same
metrics.jsonl (timing fields aside) and the same final weights.

    python tools/same_as_before.py c5a6677                    # every case below (about 20 minutes on 2 cores)
    python tools/same_as_before.py c5a6677 --cases human      # one case
    python tools/same_as_before.py c5a6677 --store /tmp/sab   # keep the earlier tree's runs there: the next
                                                              # call runs only this checkout's

The earlier tree is exported with `git archive`; each tree runs on the embedded world from its own
cache folder (PILAF_CACHE: <store>/cache-old and cache-new unless given), one thread each, one after
the other. Cases: the default run; iterative; t_pilaf; best_of_n, hybrid with XPO, IPO with the
behaviour anchor and --label argmax (shorter budgets); --from_pairs with another beta; a run SIGKILLed
part-way and resumed (against the earlier tree's uninterrupted run); two processes under torchrun;
--oracle human fed through stdin, in one sitting and in two. A maintainer's check (it needs the git
history and many minutes), not a test: run it before committing a re-arrangement, and quote it.
"""
import argparse
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMINGS = ("time", "tok_per_s", "reused")
SHORT = ["--labels", "1024", "--eval_every", "256", "--save_every", "256"]
CASES = {
    "default": ["--sampler", "pilaf"],
    "iterative": ["--sampler", "pilaf", "--mode", "iterative"],
    "t_pilaf": ["--sampler", "t_pilaf", "--n", "8"] + SHORT,
    "best_of_n": ["--sampler", "best_of_n", "--n", "4"] + SHORT,
    "hybrid_xpo": ["--sampler", "hybrid", "--xpo_alpha", "0.01"] + SHORT,
    "ipo_behavior_argmax": ["--sampler", "pilaf", "--loss", "ipo", "--reference", "behavior", "--label", "argmax"] + SHORT,
}
# answers a person types: 1 and 2 pick, s skips, x is no answer (asked again)
ANSWERS = (["1", "2", "x", "s"] + ["2", "1", "1", "s", "1", "2"] * 11)
HUMAN = ["--sampler", "pilaf", "--oracle", "human", "--labels", "64", "--batch_size", "8", "--eval_every", "32"]

def export(ref, dest):
    """The tree of commit `ref`, written into `dest`."""
    data = subprocess.run(["git", "-C", ROOT, "archive", ref], capture_output=True, check=True).stdout
    tarfile.open(fileobj=io.BytesIO(data)).extractall(dest)

def train(tree, argv, cache, stdin=None, nproc=0):
    cmd = [sys.executable, os.path.join(tree, "train.py")] if not nproc else \
          [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           os.path.join(tree, "train.py")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TQDM_DISABLE="1", PILAF_CACHE=cache)
    p = subprocess.run(cmd + argv, cwd=tree, env=env, input=stdin, capture_output=True, text=True)
    return p.returncode, p.stdout + p.stderr

def killed_then_resumed(tree, argv, out, at, cache):
    """Run, SIGKILL once `at` pairs are on disk, then --resume to the end."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", PILAF_CACHE=cache)
    p = subprocess.Popen([sys.executable, os.path.join(tree, "train.py")] + argv + ["--out", out], cwd=tree, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pairs = os.path.join(out, "pairs.jsonl")
    while p.poll() is None and (not os.path.exists(pairs) or open(pairs).read().count("\n") < at):
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not os.path.exists(os.path.join(out, "summary.json")), "the run ended before it was killed"
    return train(tree, ["--resume", out], cache)

def read(out):
    """What must agree: pairs.jsonl's bytes, metrics.jsonl without timings, the final weights."""
    from safetensors.torch import load_file
    with open(os.path.join(out, "pairs.jsonl"), "rb") as f:
        pairs = f.read()
    with open(os.path.join(out, "metrics.jsonl")) as f:
        metrics = [{k: v for k, v in json.loads(l).items() if k not in TIMINGS} for l in f]
    w = os.path.join(out, "policy", "model.safetensors")
    weights = {k: v.tolist() for k, v in load_file(w).items()} if os.path.exists(w) else None
    return pairs, metrics, weights

def compare(name, a, b, shared_keys=False):
    """a: the earlier tree's run, b: this checkout's. shared_keys: metrics compared on the earlier tree's
    keys only (for a change that adds a metric and changes nothing else)."""
    pa, ma, wa = read(a)
    pb, mb, wb = read(b)
    if shared_keys:
        mb = [{k: v for k, v in m.items() if k in old} for m, old in zip(mb, ma)] + mb[len(ma):]
    bad = [what for what, x, y in (("pairs.jsonl", pa, pb), ("metrics.jsonl", ma, mb), ("weights", wa, wb)) if x != y]
    n = pa.count(b"\n")
    print(f"{name:22s} {'SAME' if not bad else 'DIFFERENT: ' + ', '.join(bad)}  ({n} pairs, {len(ma)} evaluations)",
          flush=True)
    return not bad

def main():
    p = argparse.ArgumentParser(description="Check that this checkout trains exactly as an earlier commit.")
    p.add_argument("ref", help="the earlier commit, e.g. c5a6677")
    p.add_argument("--cases", nargs="+", default=list(CASES) + ["from_pairs", "resume", "torchrun", "human"],
                   help="which cases to run")
    p.add_argument("--store", default=None, help="keep the earlier tree's runs here and reuse them (default: a temporary folder)")
    p.add_argument("--old_cache", default=None, help="PILAF_CACHE of the earlier tree (default: <store>/cache-old)")
    p.add_argument("--new_cache", default=None, help="PILAF_CACHE of this checkout (default: <store>/cache-new)")
    p.add_argument("--shared_keys", action="store_true", help="compare metrics.jsonl on the earlier tree's keys only")
    args = p.parse_args()
    ok = True
    tmp = args.store or tempfile.mkdtemp(prefix="same-as-before-")
    old = os.path.join(tmp, f"tree-{args.ref}")
    if not os.path.isdir(old):
        export(args.ref, old)
    trees = {"old": old, "new": ROOT}
    caches = {"old": args.old_cache or os.path.join(tmp, "cache-old"), "new": args.new_cache or os.path.join(tmp, "cache-new")}

    def run(which, name, argv, **kw):
        """A case's run in one tree: the earlier tree's is kept (when finished) and reused."""
        out = os.path.join(tmp, f"{name}-{which}")
        if which == "old" and os.path.exists(os.path.join(out, "summary.json")):
            return out
        shutil.rmtree(out, ignore_errors=True)
        rc, log = train(trees[which], argv + ["--out", out], caches[which], **kw)
        assert rc == 0, f"{name} ({which}) exited {rc}:\n{log[-2000:]}"
        return out

    both = lambda name, argv, **kw: [run(which, name, argv, **kw) for which in trees]
    for name in args.cases:
        if name in CASES:
            ok &= compare(name, *both(name, CASES[name]), args.shared_keys)
        elif name == "from_pairs":
            src = run("old", "from_pairs-source", SHORT)
            ok &= compare(name, *both(name, SHORT + ["--beta", "0.2", "--from_pairs", os.path.join(src, "pairs.jsonl")]), args.shared_keys)
        elif name == "resume":
            argv = ["--sampler", "pilaf"] + SHORT
            full = run("old", "resume-uninterrupted", argv)
            cut = os.path.join(tmp, "resume-new-killed")
            shutil.rmtree(cut, ignore_errors=True)
            rc, log = killed_then_resumed(ROOT, argv, cut, 600, caches["new"])
            assert rc == 0, log[-2000:]
            ok &= compare(name, full, cut, args.shared_keys)
        elif name == "torchrun":
            ok &= compare(name, *both(name, ["--sampler", "pilaf"] + SHORT, nproc=2), args.shared_keys)
        elif name == "human":
            answers = "".join(a + "\n" for a in ANSWERS)
            ok &= compare("human (one sitting)", *both("human", HUMAN, stdin=answers), args.shared_keys)
            # the same answers in two sittings on the new tree: the input runs dry after 30 lines, then --resume
            split = os.path.join(tmp, "human-new-split")
            shutil.rmtree(split, ignore_errors=True)
            train(ROOT, HUMAN + ["--out", split], caches["new"], stdin="".join(a + "\n" for a in ANSWERS[:30]))
            rc, log = train(ROOT, ["--resume", split], caches["new"], stdin="".join(a + "\n" for a in ANSWERS[30:]))
            assert rc == 0, log[-2000:]
            ok &= compare("human (two sittings)", os.path.join(tmp, "human-old"), split, args.shared_keys)
        else:
            sys.exit(f"same_as_before.py: error: unknown case '{name}'")
    print("all the same" if ok else "SOME DIFFER")
    sys.exit(0 if ok else 1)

if __name__ == "__main__":
    main()
