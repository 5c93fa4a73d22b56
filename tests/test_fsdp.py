"""--fsdp: the policy, reference and reward model sharded with FSDP2 over two CPU processes (gloo), on the
tiny world; against DDP's run of the same options, and against itself after a kill."""
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time

import torch

from conftest import ROOT, TIMINGS, TINY_WORLD, lines, read_jsonl, weights, world_args

SMALL = ["--eval_every", "16", "--eval_prompts", "7", "--eval_samples", "5", "--max_new_tokens", "12"]   # 35 samples: 18 and 17

def command(nproc):
    """train.py under torchrun with nproc processes (0: plain python), one thread each."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py")] if nproc == 0 else \
          [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), os.path.join(ROOT, "train.py")]
    return cmd, dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")

def launch(argv, nproc=2):
    cmd, env = command(nproc)
    p = subprocess.run(cmd + argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p

def test_fsdp_starts_as_ddp_does_and_holds_half_the_policy(tiny_world, tmp_path):
    """The first batch's pairs are DDP's (each rank samples its share with the same generator from the same
    weights, gathered from the shards); the first DPO step's loss and gradient norm are DDP's, and so is the
    step itself; each rank holds half of the policy's bytes (it says so, 'on this rank')."""
    argv = ["--labels", "32", "--batch_size", "16"] + SMALL + world_args(tiny_world)
    fsdp = launch(argv + ["--fsdp", "--out", str(tmp_path / "fsdp")])
    launch(argv + ["--out", str(tmp_path / "ddp")])
    (a, b), (ma, mb) = ([read_jsonl(str(tmp_path / d / f)) for d in ("fsdp", "ddp")] for f in ("pairs.jsonl", "metrics.jsonl"))
    assert a[:16] == b[:16]
    assert ma[1]["loss"] == mb[1]["loss"] and abs(ma[1]["grad_norm"] / mb[1]["grad_norm"] - 1) < 1e-6, (ma[1], mb[1])
    assert ma[1]["reward"] == mb[1]["reward"]        # the evaluation after one step: the same samples, so the same weights
    n, mib = map(float, re.search(r"policy: ([\d.]+) M parameters, ([\d.]+) MiB on this rank", fsdp.stdout).groups())
    whole = sum(t.numel() * t.element_size() for t in weights(tiny_world).values()) / 2 ** 20
    assert abs(mib / whole - 0.5) < 0.05, (mib, whole)

def test_one_fsdp_step_moves_the_weights_as_ddp(tiny_world, tmp_path):
    """One step on 16 pairs, gathered into an ordinary Hugging Face folder at the end: DDP's update, to float
    rounding relative to its size (AdamW's first step counts once: asking for a fresh optimizer's state to
    checkpoint it would have taken a step of its own). With activation checkpointing too: its blocks recompute
    inside FSDP's gathers."""
    argv = ["--labels", "16", "--batch_size", "16"] + SMALL + world_args(tiny_world)
    said = {d: launch(argv + extra + ["--out", str(tmp_path / d)]).stdout
            for d, extra in (("fsdp", ["--fsdp", "--activation_checkpointing"]), ("ddp", []))}
    assert f"activation checkpointing: {TINY_WORLD['n_layer']} blocks of the policy recomputed" in said["fsdp"]
    ref = weights(tiny_world)
    one, two = (torch.cat([(weights(str(tmp_path / d))[k] - ref[k]).flatten() for k in sorted(ref)]) for d in ("ddp", "fsdp"))
    assert one.abs().max() > 1e-4 and ((two - one).norm() / one.norm()).item() < 1e-4

def test_fsdp_resumes_after_a_kill_to_the_same_numbers(tiny_world, tmp_path):
    """Checkpoints of shards (torch.distributed.checkpoint): a whole job killed mid-run and resumed ends as the
    uninterrupted sharded run ends, pairs, metrics and weights."""
    argv = ["--labels", "96", "--batch_size", "16", "--save_every", "32", "--fsdp"] + SMALL + world_args(tiny_world)
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    launch(argv + ["--out", full])
    cmd, env = command(2)
    p = subprocess.Popen(cmd + argv + ["--out", cut], env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while lines(os.path.join(cut, "pairs.jsonl")) < 48 and p.poll() is None:
        time.sleep(0.005)
    for pid in [int(d) for d in os.listdir("/proc") if d.isdigit()]:     # torchrun and both ranks
        try:
            if cut.encode() in open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0"):
                os.kill(pid, signal.SIGKILL)
        except OSError:
            continue
    p.wait()
    assert not os.path.exists(os.path.join(cut, "summary.json")), "the run ended before it could be killed"
    ck = json.load(open(os.path.join(cut, "checkpoint.json")))
    assert os.path.exists(os.path.join(cut, ck["dir"], "sharded", ".metadata")) and lines(os.path.join(cut, "pairs.jsonl")) > ck["labels"]
    launch(["--resume", cut])
    assert open(os.path.join(cut, "pairs.jsonl")).read() == open(os.path.join(full, "pairs.jsonl")).read()
    drop = lambda ms: [{k: v for k, v in m.items() if k not in TIMINGS} for m in ms]
    assert drop(read_jsonl(os.path.join(cut, "metrics.jsonl"))) == drop(read_jsonl(os.path.join(full, "metrics.jsonl")))
    a, b = weights(full), weights(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)

class Marker:
    """What a planted checkpoint index would build: a file, if unpickling ran it."""
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))

def test_a_sharded_checkpoint_that_asks_for_other_code_is_refused(tiny_world, tmp_path):
    """--fsdp on one process (a group of one): its checkpoint's index is read by an unpickler that builds
    only what such an index holds; one that asks for anything else is refused in one line, nothing run."""
    run, marker = str(tmp_path / "run"), str(tmp_path / "RAN")
    launch(["--fsdp", "--labels", "16", "--batch_size", "8", "--save_every", "8"] + SMALL + world_args(tiny_world)
           + ["--out", run], nproc=0)
    os.remove(os.path.join(run, "summary.json"))
    ck = json.load(open(os.path.join(run, "checkpoint.json")))
    with open(os.path.join(run, ck["dir"], "sharded", ".metadata"), "wb") as f:
        pickle.dump(Marker(marker), f)
    cmd, env = command(0)
    p = subprocess.run(cmd + ["--resume", run], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1 and "which a checkpoint's index does not hold" in err[0], p.stderr[-2000:]
    assert not os.path.exists(marker)
