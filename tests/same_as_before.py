"""
Does this checkout train exactly as an earlier commit did? For a change that only re-arranges code
(a re-cut, a rename): the same command in both trees must write byte-identical pairs.jsonl, the same
metrics.jsonl (timing fields aside) and the same final weights.

    python tests/same_as_before.py da8cc46                 # every case below (about 15 minutes on 2 cores)
    python tests/same_as_before.py da8cc46 --cases human   # one case

The earlier tree is exported with `git archive` into a temporary folder; both run on the embedded
world (built once into the default cache), one thread each, one after the other. Cases: the default
run; iterative; best_of_n, hybrid with XPO, IPO with the behaviour anchor and --label argmax
(shorter budgets); --from_pairs with another beta; a run SIGKILLed part-way and resumed (against the
earlier tree's uninterrupted run); two processes under torchrun; --oracle human fed through stdin,
in one sitting and in two. Not a test (it needs the git history and minutes): a check to run before
committing a re-arrangement, and to quote in its message.
"""
import argparse
import io
import json
import os
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

def env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TQDM_DISABLE="1")

def train(tree, argv, stdin=None, nproc=0):
    cmd = [sys.executable, os.path.join(tree, "train.py")] if not nproc else \
          [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           os.path.join(tree, "train.py")]
    p = subprocess.run(cmd + argv, cwd=tree, env=env(), input=stdin, capture_output=True, text=True)
    return p.returncode, p.stdout + p.stderr

def killed_then_resumed(tree, argv, out, at):
    """Run, SIGKILL once `at` pairs are on disk, then --resume to the end."""
    p = subprocess.Popen([sys.executable, os.path.join(tree, "train.py")] + argv + ["--out", out], cwd=tree, env=env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pairs = os.path.join(out, "pairs.jsonl")
    while p.poll() is None and (not os.path.exists(pairs) or open(pairs).read().count("\n") < at):
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not os.path.exists(os.path.join(out, "summary.json")), "the run ended before it was killed"
    return train(tree, ["--resume", out])

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

def compare(name, a, b):
    pa, ma, wa = read(a)
    pb, mb, wb = read(b)
    bad = [what for what, x, y in (("pairs.jsonl", pa, pb), ("metrics.jsonl", ma, mb), ("weights", wa, wb)) if x != y]
    n = pa.count(b"\n")
    print(f"{name:22s} {'SAME' if not bad else 'DIFFERENT: ' + ', '.join(bad)}  ({n} pairs, {len(ma)} evaluations)",
          flush=True)
    return not bad

def main():
    p = argparse.ArgumentParser(description="Check that this checkout trains exactly as an earlier commit.")
    p.add_argument("ref", help="the earlier commit, e.g. da8cc46")
    p.add_argument("--cases", nargs="+", default=list(CASES) + ["from_pairs", "resume", "torchrun", "human"],
                   help="which cases to run")
    args = p.parse_args()
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        old = os.path.join(tmp, "old")
        export(args.ref, old)
        trees = {"old": old, "new": ROOT}
        def both(name, argv, **kw):
            outs = []
            for which, tree in trees.items():
                out = os.path.join(tmp, f"{name}-{which}")
                rc, log = train(tree, argv + ["--out", out], **kw)
                assert rc == 0, f"{name} ({which}) exited {rc}:\n{log[-2000:]}"
                outs.append(out)
            return outs
        for name in args.cases:
            if name in CASES:
                ok &= compare(name, *both(name, CASES[name]))
            elif name == "from_pairs":
                src = os.path.join(tmp, "from_pairs-source")
                assert train(ROOT, SHORT + ["--out", src])[0] == 0
                ok &= compare(name, *both(name, SHORT + ["--beta", "0.2", "--from_pairs", os.path.join(src, "pairs.jsonl")]))
            elif name == "resume":
                argv = ["--sampler", "pilaf"] + SHORT
                full = os.path.join(tmp, "resume-old-uninterrupted")
                assert train(old, argv + ["--out", full])[0] == 0
                cut = os.path.join(tmp, "resume-new-killed")
                rc, log = killed_then_resumed(ROOT, argv, cut, at=600)
                assert rc == 0, log[-2000:]
                ok &= compare(name, full, cut)
            elif name == "torchrun":
                ok &= compare(name, *both(name, ["--sampler", "pilaf"] + SHORT, nproc=2))
            elif name == "human":
                answers = "".join(a + "\n" for a in ANSWERS)
                ok &= compare("human (one sitting)", *both("human", HUMAN, stdin=answers))
                # the same answers in two sittings on the new tree: the input runs dry after 30 lines, then --resume
                split = os.path.join(tmp, "human-new-split")
                train(ROOT, HUMAN + ["--out", split], stdin="".join(a + "\n" for a in ANSWERS[:30]))
                rc, log = train(ROOT, ["--resume", split], stdin="".join(a + "\n" for a in ANSWERS[30:]))
                assert rc == 0, log[-2000:]
                ok &= compare("human (two sittings)", os.path.join(tmp, "human-old"), split)
            else:
                sys.exit(f"same_as_before.py: error: unknown case '{name}'")
    print("all the same" if ok else "SOME DIFFER")
    sys.exit(0 if ok else 1)

if __name__ == "__main__":
    main()
