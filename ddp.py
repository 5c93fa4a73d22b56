"""
More than one process: torchrun and PyTorch DDP, nanoGPT's way. A plain `python train.py` is rank 0
of 1, and every helper here is then the identity (or does nothing), so the stages in train.py read
as one process's algorithm:

    share(xs)     this rank's contiguous block of a batch's prompts (collect, update); offset(n): its start
    deal(xs)      this rank's items dealt round-robin, rank::nproc (evaluate's held-out samples)
    gather(xs)    every rank's share, in rank order: the whole batch on every rank
    total(xs)     numbers summed over the ranks (a batch's sampling cost, evaluation's sums)
    mean(d)       a dict of numbers averaged over the ranks (the training statistics of a step)
    everyone(x)   a picklable value from every rank (the generator states a checkpoint keeps)
    seed(s)       rank r's generators start from s + r * SEED_STRIDE (rank 0: the plain run's)

Under torchrun every rank samples and labels its share of each batch, all ranks train on the whole
batch's pairs (DDP averages the gradients of their shares), and rank 0 alone writes the run folder.
gloo on a CPU (so the tests cover it), nccl on GPUs.
"""
import os
from datetime import timedelta

import torch
import torch.distributed as dist

on, rank, nproc = False, 0, 1
SEED_STRIDE = 1_000_003

def procs():
    """The number of processes torchrun started (1 without it): known before init, for the option checks."""
    return int(os.environ.get("WORLD_SIZE", 1))

def init(device):
    """Join torchrun's process group, if there is one. -> the device this rank uses"""
    global on, rank, nproc
    on = "RANK" in os.environ
    if not on:
        return device
    rank, nproc = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    # a rank that dies takes the others down: torchrun stops the job, and no collective waits past the timeout
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=timedelta(minutes=10))
    return device

def first(fn):
    """fn() on rank 0 first (it may build the embedded world, once), then on the other ranks."""
    if on and rank:
        dist.barrier()
    out = fn()
    if on and rank == 0:
        dist.barrier()
    return out

def wrap(model):
    """The model the loss is taken through: DDP averages the ranks' gradients in backward()."""
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model) if on else model

def share(xs):
    n = len(xs) // nproc
    return xs[rank * n:(rank + 1) * n]

def offset(n):
    """Where this rank's share of n items starts."""
    return rank * n // nproc

def deal(xs):
    return xs[rank::nproc]

def gather(xs):
    if not on:
        return xs
    shares = [None] * nproc
    dist.all_gather_object(shares, xs)
    return [x for s in shares for x in s]

def everyone(x):
    if not on:
        return [x]
    out = [None] * nproc
    dist.all_gather_object(out, x)
    return out

def total(xs):
    """A tensor (or list of numbers) summed over the ranks, as a tensor."""
    t = torch.as_tensor(xs)
    if on:
        dist.all_reduce(t)
    return t

def mean(d):
    if not on:
        return d
    t = torch.tensor(list(d.values()), dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(d, (t / nproc).tolist()))

def seed(s):
    return s + rank * SEED_STRIDE

def close(run):
    """Every rank leaves together. DDP's reducer goes first, while the group lives (freed at exit it
    can deadlock gloo's teardown)."""
    if on:
        run.model = None
        dist.barrier()
        dist.destroy_process_group()
