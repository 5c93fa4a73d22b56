"""
The run folder's state on disk: what `python train.py --resume <run folder>` needs to continue a
run killed at any moment (SIGKILL included) and end with the same numbers as a run never stopped.

    <run>/config.json          the run's options (written once, atomically)
    <run>/pairs.jsonl          every labelled pair, appended one batch per write, flushed before any
                               training on it: labels cost money, so they reach the disk first
    <run>/metrics.jsonl        one line per evaluation, appended and flushed
    <run>/checkpoints/<name>/  policy/ (save_pretrained: safetensors + config), optimizer.pt,
                               rng.pt (torch and generator states)
    <run>/checkpoint.json      which checkpoint is the latest, with the counters: labels used, steps,
                               prompt order, python RNG state, how many lines of pairs.jsonl and
                               metrics.jsonl it accounts for

A checkpoint is written aside under a temporary name, renamed into place, and only then named by
checkpoint.json, itself replaced atomically (temporary file, then os.replace). So a kill leaves
either the old checkpoint or the new one, never half of one, and a checkpoint never counts pairs
that are not on disk (they were flushed before the training it saves). Loading never runs foreign
code: safetensors for weights, torch.load(weights_only=True) for tensors, JSON for the rest.
"""
import json
import os
import shutil

import torch

POINTER = "checkpoint.json"

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

def read_lines(path):
    """The complete lines of a .jsonl file (a kill in the middle of a write can leave a torn last one)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.readlines()
    return [l for l in lines if l.endswith("\n")]

def save(out, name, policy, tok, opt, rngs, state):
    """Write checkpoint `name` of the run in `out`, then make it the latest; older ones are removed."""
    root = os.path.join(out, "checkpoints")
    tmp, final = os.path.join(root, "." + name), os.path.join(root, name)
    for d in (tmp, final):            # left over from a life that was killed before naming it
        shutil.rmtree(d, ignore_errors=True)
    os.makedirs(tmp)
    policy.save_pretrained(os.path.join(tmp, "policy"))   # safetensors, loadable as --init_from too
    tok.save_pretrained(os.path.join(tmp, "policy"))
    torch.save(opt.state_dict(), os.path.join(tmp, "optimizer.pt"))
    torch.save(rngs, os.path.join(tmp, "rng.pt"))
    os.replace(tmp, final)
    write_json(os.path.join(out, POINTER), dict(state, dir=os.path.join("checkpoints", name)))
    for d in os.listdir(root):        # only now is the older checkpoint no longer needed
        if d != name:
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)

def latest(out):
    """The latest checkpoint's counters (with 'dir', its folder), or None if the run has none."""
    path = os.path.join(out, POINTER)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        state = json.load(f)
    state["dir"] = os.path.join(out, state["dir"])
    return state

def load_tensors(ckpt_dir):
    """Optimizer and RNG states of a checkpoint, read without running any pickled code."""
    opt = torch.load(os.path.join(ckpt_dir, "optimizer.pt"), weights_only=True)
    rngs = torch.load(os.path.join(ckpt_dir, "rng.pt"), weights_only=True)
    return opt, rngs
