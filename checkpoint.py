"""
Checkpoints: what `python train.py --resume <run folder>` needs to continue a run killed at any moment
(SIGKILL included) and end with the same numbers as a run never stopped.

    <run>/checkpoints/<name>/  policy/ (save_pretrained: safetensors + config), optimizer.pt,
                               rng.pt (torch's and every rank's generator states)
    <run>/checkpoint.json      which checkpoint is the latest, with the run's counters (train.Run):
                               labels used, steps, prompt order, Python's RNG state, how many lines of
                               pairs.jsonl and metrics.jsonl it accounts for and a hash of those pairs

A checkpoint is written aside under a temporary name, renamed into place, and only then named by
checkpoint.json, itself replaced atomically. So a kill leaves either the old checkpoint or the new one,
never half of one, and a checkpoint never counts pairs that are not on disk (they were flushed before
the training it saves). Loading never runs foreign code: safetensors for weights,
torch.load(weights_only=True) for tensors, JSON for the rest. Under torchrun rank 0 alone writes.
"""
import dataclasses
import hashlib
import io
import json
import math
import os
import pickle
import shutil
import time

import torch

import ddp
from errors import Stop, UserError, leave
from folder import POINTER, read_lines, still_ours, write_json
from sample import NOT_FINITE

def save(run, w):
    """A checkpoint: everything the next round depends on, and a hash of the pairs.jsonl lines it
    accounts for, so that a resume can tell a damaged file. A policy whose weights are not finite is
    never saved: the last good checkpoint stays the latest."""
    if not torch.isfinite(torch.nn.utils.get_total_norm(list(w.policy.parameters()))):
        raise Stop("the policy's weights are not finite (or overflow) after the last DPO step", 1, NOT_FINITE)
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
    for line in read_lines(path)[:n]:
        h.update(line.encode())
    return h.hexdigest()

def latest(out):
    """The latest checkpoint's counters (with 'dir', its folder, and 'policy'), or None if the run has
    none. A damaged checkpoint.json or a missing checkpoint folder exits 2 with one line."""
    path = os.path.join(out, POINTER)
    if not os.path.exists(path):
        return None
    damaged = (f"train on its labels with --from_pairs {out}/pairs.jsonl and another --out")
    try:
        with open(path) as f:
            state = json.load(f)
        missing = [k for k in ("labels", "metrics", "time", "python_rng", "nproc", "dir") if k not in state]
        if missing:
            raise ValueError(f"no '{missing[0]}'")
    except (ValueError, TypeError) as e:
        raise UserError(f"{path} is damaged ({e}) -- the run cannot continue from it; {damaged}") from None
    state["dir"] = os.path.join(out, state["dir"])
    state["policy"] = os.path.join(state["dir"], "policy")
    for f in ("policy/config.json", "optimizer.pt", "rng.pt"):
        if not os.path.exists(os.path.join(state["dir"], f)):
            raise UserError(f"{path} names {state['dir']}, which has no {f} -- the checkpoint was removed or moved; "
                            f"{damaged}")
    return state

def restore(run, ck):
    """Set `run` (train.start's: counters, generators, optimizer) where checkpoint `ck` left it, after
    checking that the folder holds what the checkpoint accounts for: at least its lines of pairs.jsonl,
    unchanged (their hash), and of metrics.jsonl. Under torchrun each rank takes its own generators."""
    out = run.out
    missing = [f.name for f in dataclasses.fields(run) if f.name not in ck]
    if missing:
        raise UserError(f"{out}/{POINTER} is damaged (no '{missing[0]}') -- the run cannot continue from it; train on "
                        f"its labels with --from_pairs {out}/pairs.jsonl and another --out")
    if ck["nproc"] != ddp.nproc:
        raise UserError(f"--resume {out}: the run was made with {ck['nproc']} processes, this is {ddp.nproc} -- resume it "
                        + (f"with torchrun --nproc_per_node {ck['nproc']}" if ck["nproc"] > 1 else "with plain python train.py"))
    pairs_path = os.path.join(out, "pairs.jsonl")
    lines, metrics = read_lines(pairs_path), read_lines(os.path.join(out, "metrics.jsonl"))
    damaged = (f"pairs.jsonl holds {len(lines)} pairs, fewer than its checkpoint's {ck['labels']}"
               if len(lines) < ck["labels"] else
               f"metrics.jsonl holds {len(metrics)} evaluations, fewer than its checkpoint's {ck['metrics']}"
               if len(metrics) < ck["metrics"] else
               f"the first {ck['labels']} lines of pairs.jsonl are not the ones its checkpoint counted"
               if ck.get("pairs_sha256") not in (None, lines_hash(pairs_path, ck["labels"])) else None)
    if damaged:
        raise UserError(f"--resume {out}: {damaged} -- the folder was changed since; train on its labels with "
                        f"--from_pairs {pairs_path} and another --out")
    for f in dataclasses.fields(run):
        setattr(run, f.name, ck[f.name])
    run.t0 -= ck["time"]
    s = ck["python_rng"]
    run.rng.setstate((s[0], tuple(s[1]), s[2]))
    opt, rngs = load_tensors(ck["dir"])
    run.opt.load_state_dict(opt)
    torch.set_rng_state(rngs["torch"])
    run.g_sample.set_state(rngs["sample"][ddp.rank])
    run.g_label.set_state(rngs["label"][ddp.rank])

def load_tensors(ckpt_dir):
    """Optimizer and RNG states of a checkpoint, read without running any pickled code."""
    got = []
    for f in ("optimizer.pt", "rng.pt"):
        try:
            got.append(torch.load(os.path.join(ckpt_dir, f), weights_only=True))
        except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
            raise UserError(f"{os.path.join(ckpt_dir, f)} holds something other than tensors ({str(e).splitlines()[0][:80]}) "
                            f"and is not read -- it was not written by train.py; start the run again with --overwrite") from None
    return got

def finite_or_stop(run, loss, norm):
    """A non-finite loss or gradient norm stops the run before the step: one line, nothing more
    written, the last good checkpoint kept (the same on every rank: the statistics are reduced)."""
    why = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {norm.item()}" \
        if not torch.isfinite(norm) else None
    if why:
        ck = latest(run.out)
        leave(f"train.py: stopped at step {run.steps + 1}: {why} -- the last good checkpoint ({ck['labels']} labels, "
              f"{ck['dir']}) is kept, with every label bought since; lower --lr, or start again with another --seed", 1)

def finish(run, w):
    """The final policy, then summary.json, whose presence marks a finished run (both atomic)."""
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
    print(f"the run is in {run.out}/: summary.json, metrics.jsonl, pairs.jsonl, policy/")
