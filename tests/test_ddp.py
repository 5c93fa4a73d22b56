"""The same loop under torchrun: two CPU processes with the gloo backend, on the tiny world."""
import json
import os
import signal
import subprocess
import sys
import time

import torch

from conftest import TIMINGS, read_jsonl, weights, world_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--eval_every", "32", "--eval_prompts", "8", "--eval_samples", "2", "--max_new_tokens", "12"]

def command(nproc):
    """The command line of train.py under torchrun with nproc processes (nproc=0: plain python), and
    its environment (one thread per process: two ranks share the 2 cores)."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py")] if nproc == 0 else \
          [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           os.path.join(ROOT, "train.py")]
    return cmd, dict(os.environ, OMP_NUM_THREADS="1")

def launch(argv, nproc):
    cmd, env = command(nproc)
    return subprocess.run(cmd + argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)

def test_two_processes_spend_exactly_the_budget(tiny_world, tmp_path):
    out = str(tmp_path / "run")
    p = launch(["--sampler", "pilaf", "--labels", "64", "--batch_size", "16", "--out", out] + SMALL + world_args(tiny_world), 2)
    assert p.returncode == 0, p.stderr[-3000:]
    pairs = read_jsonl(os.path.join(out, "pairs.jsonl"))
    metrics = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert len(pairs) == 64 and [m["labels"] for m in metrics] == [0, 32, 64] and metrics[-1]["step"] == 4
    assert {p["chosen_src"] for p in pairs} == {"pi", "pi+", "pi-"}
    assert metrics[-1]["judged_per_label"] == 2 and 2 <= metrics[-1]["fwd_per_pair"] <= 4     # both ranks' costs
    assert json.load(open(os.path.join(out, "summary.json"))) == metrics[-1]
    assert p.stdout.count("step    0 |") == 1                                            # rank 0 alone reports
    # the two ranks sampled with different generators: no two pairs of a batch are the same responses
    ids = [tuple(p["chosen_ids"]) + (-1,) + tuple(p["rejected_ids"]) for p in pairs]
    assert len(set(ids)) > 60

def test_one_dpo_update_is_the_same_on_two_processes(tiny_world, tmp_path):
    """One DPO step on 16 fixed pairs: each of 2 ranks takes 8 and DDP averages their gradients, which
    must move the weights as a single process does from all 16, to float rounding. Compared as whole
    updates, relative to the update's size: AdamW's first step divides each gradient by its own
    magnitude, so a weight whose gradient is near 0 can turn a rounding difference of the sums into a
    sizeable part of its step, but such weights are few, and every other weight moves by about lr
    either way. A rank training on its own share alone changes a large part of the update's signs."""
    src = str(tmp_path / "src")
    assert launch(["--labels", "16", "--batch_size", "16", "--out", src] + SMALL + world_args(tiny_world), 0).returncode == 0
    runs = {}
    for nproc in (0, 2):
        out = str(tmp_path / f"p{nproc}")
        p = launch(["--from_pairs", os.path.join(src, "pairs.jsonl"), "--labels", "16", "--batch_size", "16",
                    "--out", out] + SMALL + world_args(tiny_world), nproc)
        assert p.returncode == 0, p.stderr[-3000:]
        runs[nproc] = weights(out)
    ref = weights(tiny_world)
    one, two = (torch.cat([(w[k] - ref[k]).flatten() for k in sorted(ref)]) for w in (runs[0], runs[2]))
    assert one.abs().max().item() > 1e-4                                   # the step moved the weights (AdamW: about lr = 3e-4)
    diff = ((two - one).norm() / one.norm()).item()
    print(f"|update(2 processes) - update(1)| / |update(1)| = {diff:.1e}")
    assert diff < 1e-3

def test_a_batch_that_does_not_split_exits_in_one_line(tiny_world, tmp_path):
    out = str(tmp_path / "run")
    p = launch(["--batch_size", "15", "--labels", "60", "--out", out] + world_args(tiny_world), 2)
    assert p.returncode != 0
    ours = [l for l in p.stderr.splitlines() if l.startswith("train.py: error:")]
    assert ours == ["train.py: error: --batch_size (15) and the pairs per round (15) must split evenly across the 2 "
                    "processes -- pick a --batch_size and --labels that are multiples of 2"], p.stderr[-2000:]
    assert not os.path.exists(out)

def test_two_processes_resume_after_a_kill(tiny_world, tmp_path):
    """--resume under torchrun: the whole job killed mid-run (SIGKILL to every process), resumed with
    2 processes again; the finished run equals an uninterrupted 2-process run."""
    argv = ["--labels", "128", "--batch_size", "16", "--save_every", "32"] + SMALL + world_args(tiny_world)
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    assert launch(argv + ["--out", full], 2).returncode == 0
    torchrun, env = command(2)
    p = subprocess.Popen(torchrun + argv + ["--out", cut], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    pairs = os.path.join(cut, "pairs.jsonl")
    while (not os.path.exists(pairs) or open(pairs).read().count("\n") < 48) and p.poll() is None:
        time.sleep(0.005)
    # torchrun and both ranks at once (the ranks run in sessions of their own: find them by their --out)
    for pid in [int(d) for d in os.listdir("/proc") if d.isdigit()]:
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if cut.encode() in cmd:
            os.kill(pid, signal.SIGKILL)
    p.wait()
    assert not os.path.exists(os.path.join(cut, "summary.json")), "the run ended before it could be killed"
    r = launch(["--resume", cut], 2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "reused, not bought again" in r.stdout and r.stdout.count("resuming") == 1      # rank 0 alone says it
    assert open(pairs).read() == open(os.path.join(full, "pairs.jsonl")).read()
    drop = lambda ms: [{k: v for k, v in m.items() if k not in TIMINGS} for m in ms]
    assert drop(read_jsonl(os.path.join(cut, "metrics.jsonl"))) == drop(read_jsonl(os.path.join(full, "metrics.jsonl")))
    a, b = weights(full), weights(cut)
    assert all((a[k] == b[k]).all() for k in a)
