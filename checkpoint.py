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
from folder import POINTER, lines_hash, read_lines, still_ours, write_json
from sample import NOT_FINITE

SHARDS = "sharded"   # an --fsdp checkpoint's folder of shards (torch.distributed.checkpoint)

def save(run, w):
    """A checkpoint: everything the next round depends on, and a hash of the pairs.jsonl lines it
    accounts for, so that a resume can tell a damaged file. A policy whose weights are not finite is
    never saved: the last good checkpoint stays the latest."""
    if not torch.isfinite(ddp.full(torch.nn.utils.get_total_norm(list(w.policy.parameters())))):
        raise Stop("the policy's weights are not finite (or overflow) after the last DPO step", 1, NOT_FINITE)
    state = dict(dataclasses.asdict(run), time=time.time() - run.t0, python_rng=run.rng.getstate(), nproc=ddp.nproc)
    gens = ddp.everyone((run.g_sample.get_state(), run.g_label.get_state()))       # one pair per rank
    name = f"labels-{run.labels:07d}"
    root = os.path.join(run.out, "checkpoints")
    tmp, final = os.path.join(root, "." + name), os.path.join(root, name)
    if ddp.rank == 0:
        still_ours()
        for d in (tmp, final):        # left over from a life that was killed before naming it
            shutil.rmtree(d, ignore_errors=True)
        os.makedirs(tmp)
    if ddp.fsdp:                      # the policy's and AdamW's shards, every rank its own
        ddp.barrier()
        ddp.save_sharded(os.path.join(tmp, SHARDS), w.policy, run.opt)
        ddp.barrier()
    if ddp.rank:
        return
    state["pairs_sha256"] = lines_hash(os.path.join(run.out, "pairs.jsonl"), run.labels)
    state["config_sha256"] = file_hash(os.path.join(run.out, "config.json"))
    if w.source is not None:      # --from_pairs: the lines of the source file this run trains on
        state["source_sha256"] = w.source_sha256
    rngs = dict(torch=torch.get_rng_state(), sample=[s for s, _ in gens], label=[l for _, l in gens])
    if not ddp.fsdp:
        w.policy.save_pretrained(os.path.join(tmp, "policy"))   # safetensors, loadable as --init_from too
        w.tok.save_pretrained(os.path.join(tmp, "policy"))
    for f, obj in ((("optimizer.pt", run.opt.state_dict()),) if not ddp.fsdp else ()) + (("rng.pt", rngs),):
        buf = io.BytesIO()            # serialised in memory, written by us: a full disk is a plain OSError
        torch.save(obj, buf)
        with open(os.path.join(tmp, f), "wb") as fh:
            fh.write(buf.getvalue())
    os.replace(tmp, final)
    write_json(os.path.join(run.out, POINTER), dict(state, dir=os.path.join("checkpoints", name)))
    for d in os.listdir(root):        # only now is the older checkpoint no longer needed (unless all are kept)
        if d != name and (d.startswith(".") or not run.keep_checkpoints):
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)

def damaged(out, why):
    return UserError(f"{os.path.join(out, POINTER)} is damaged ({why}) -- the run cannot continue from it; train on "
                     f"its labels with --from_pairs {out}/pairs.jsonl and another --out")

def latest(out):
    """The latest checkpoint's counters (with 'dir', its folder, and 'policy'), or None if the run has
    none. A damaged checkpoint.json, or one that names a checkpoint that is not this run's own, raises
    UserError (one line, exit 2)."""
    path = os.path.join(out, POINTER)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            state = json.load(f)
    except ValueError as e:
        raise damaged(out, e) from None
    if not isinstance(state, dict):
        raise damaged(out, "not an object")
    missing = [k for k in ("labels", "metrics", "time", "python_rng", "nproc", "dir") if k not in state]
    if missing:
        raise damaged(out, f"no '{missing[0]}'")
    if not all(_count(state[k]) for k in ("labels", "metrics", "nproc")) or not isinstance(state["time"], (int, float)):
        raise damaged(out, "its counters are not counts")
    if state["dir"] != os.path.join("checkpoints", f"labels-{state['labels']:07d}"):   # this run's own, at its count
        raise damaged(out, f"it names {state['dir']!r}, not this run's checkpoint at {state['labels']} labels")
    state["dir"] = os.path.join(out, state["dir"])
    sharded = os.path.exists(os.path.join(state["dir"], SHARDS))     # an --fsdp run's: its shards, no policy/ folder
    state["policy"] = None if sharded else os.path.join(state["dir"], "policy")
    for f in (f"{SHARDS}/.metadata", "rng.pt") if sharded else ("policy/config.json", "optimizer.pt", "rng.pt"):
        if not os.path.exists(os.path.join(state["dir"], f)):
            raise UserError(f"{path} names {state['dir']}, which has no {f} -- the checkpoint was removed or moved; "
                            f"train on its labels with --from_pairs {out}/pairs.jsonl and another --out")
    return state

def _count(x):
    return type(x) is int and x >= 0

def restore(run, ck, w):
    """Set `run` (train.start's: counters, generators, optimizer) where checkpoint `ck` left it, after
    checking that the folder holds what the checkpoint accounts for: at least its lines of pairs.jsonl,
    unchanged (their hash), and of metrics.jsonl, config.json as it was, and --from_pairs' source as it
    was; and that what it saved is what a run saves (its prompt order indexes w's training prompts).
    Under torchrun each rank takes its own generators."""
    out = run.out
    missing = [f.name for f in dataclasses.fields(run) if f.name not in ck]
    if missing:
        raise damaged(out, f"no '{missing[0]}'")
    kinds = {f.name: type(getattr(run, f.name)) for f in dataclasses.fields(run)}
    bad = [k for k, t in kinds.items() if not (_count(ck[k]) if t is int else isinstance(ck[k], (int, float))
                                               if t is float else ck[k] is None or isinstance(ck[k], dict)
                                               if k == "last" else isinstance(ck[k], t))]
    if bad or not all(_count(i) and i < len(w.train_prompts) for i in ck["order"]):
        raise damaged(out, f"'{bad[0] if bad else 'order'}' is not what a run saves there")
    if ck["nproc"] != ddp.nproc:
        raise UserError(f"--resume {out}: the run was made with {ck['nproc']} processes, this is {ddp.nproc} -- resume it "
                        + (f"with torchrun --nproc_per_node {ck['nproc']}" if ck["nproc"] > 1 else "with plain python train.py"))
    pairs_path = os.path.join(out, "pairs.jsonl")
    lines, metrics = read_lines(pairs_path), read_lines(os.path.join(out, "metrics.jsonl"))
    changed = (f"pairs.jsonl holds {len(lines)} pairs, fewer than its checkpoint's {ck['labels']}"
               if len(lines) < ck["labels"] else
               f"metrics.jsonl holds {len(metrics)} evaluations, fewer than its checkpoint's {ck['metrics']}"
               if len(metrics) < ck["metrics"] else
               f"the first {ck['labels']} lines of pairs.jsonl are not the ones its checkpoint counted"
               if ck.get("pairs_sha256") not in (None, lines_hash(pairs_path, ck["labels"])) else
               "config.json is not the one the run started with"
               if ck.get("config_sha256") not in (None, file_hash(os.path.join(out, "config.json"))) else
               f"the --from_pairs file it trains on ({w.source_path}) changed since it started"
               if w.source is not None and ck.get("source_sha256") != w.source_sha256 else None)
    if changed:
        raise UserError(f"--resume {out}: {changed} -- the folder was changed since; train on its labels with "
                        f"--from_pairs {pairs_path} and another --out")
    try:
        s = ck["python_rng"]
        run.rng.setstate((s[0], tuple(s[1]), s[2]))
    except (TypeError, ValueError, IndexError, KeyError) as e:
        raise damaged(out, f"'python_rng' is not a random state: {e}") from None
    for f in dataclasses.fields(run):
        setattr(run, f.name, ck[f.name])
    run.t0 -= ck["time"]
    opt, rngs = load_tensors(ck["dir"], sharded=ck["policy"] is None)
    try:
        if opt is None:                # --fsdp: the policy's and AdamW's shards, every rank its own
            ddp.load_sharded(os.path.join(ck["dir"], SHARDS), run.model, run.opt, stepped=ck["steps"] > 0)
        else:
            run.opt.load_state_dict(opt)
        torch.set_rng_state(rngs["torch"])
        run.g_sample.set_state(rngs["sample"][ddp.rank])
        run.g_label.set_state(rngs["label"][ddp.rank])
    except (TypeError, ValueError, IndexError, KeyError, RuntimeError) as e:
        raise UserError(f"{ck['dir']} holds optimizer or generator states of another run ({str(e).splitlines()[0][:80]}) "
                        f"-- train on its labels with --from_pairs {pairs_path} and another --out") from None

def file_hash(path):
    """sha256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()

def load_tensors(ckpt_dir, sharded=False):
    """Optimizer and RNG states of a checkpoint, read without running any pickled code (an --fsdp run's
    optimizer is in its shards: None)."""
    got = [None] if sharded else []
    for f in ("rng.pt",) if sharded else ("optimizer.pt", "rng.pt"):
        try:
            got.append(torch.load(os.path.join(ckpt_dir, f), weights_only=True))
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
            raise UserError(f"{os.path.join(ckpt_dir, f)} holds something other than tensors, or is cut short "
                            f"({str(e).splitlines()[0][:80]}), and is not read -- it was not written whole by train.py; "
                            f"train on the run's labels with --from_pairs and another --out") from None
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
    """The final policy (an --fsdp run's gathered whole on rank 0: an ordinary Hugging Face folder), then
    summary.json, whose presence marks a finished run (both atomic)."""
    whole = ddp.full_state(w.policy)
    if ddp.rank:
        return
    still_ours()
    tmp = os.path.join(run.out, ".policy")
    shutil.rmtree(tmp, ignore_errors=True)
    w.policy.save_pretrained(tmp, state_dict=whole)
    w.tok.save_pretrained(tmp)
    shutil.rmtree(os.path.join(run.out, "policy"), ignore_errors=True)
    os.replace(tmp, os.path.join(run.out, "policy"))
    write_json(os.path.join(run.out, "summary.json"), run.last)
    print(f"the run is in {run.out}/: summary.json, metrics.jsonl, pairs.jsonl, policy/")
