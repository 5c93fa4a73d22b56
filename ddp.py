"""
More than one process: torchrun, with PyTorch DDP (nanoGPT's way) or FSDP2 (--fsdp). A plain
`python train.py` is rank 0 of 1, and every helper here is then the identity (or does nothing), so
the stages in train.py read as one process's algorithm:

    share(xs)     this rank's contiguous block of a batch's prompts (collect, update); offset(n): its start
    deal(xs)      this rank's items dealt round-robin, rank::nproc (evaluate's held-out samples)
    gather(xs)    every rank's share, in rank order: the whole batch on every rank
    total(xs)     numbers summed over the ranks (a batch's sampling cost, evaluation's sums)
    mean(d)       a dict of numbers averaged over the ranks (the training statistics of a step)
    everyone(x)   a picklable value from every rank (the generator states a checkpoint keeps)
    seed(s)       rank r's generators start from s + r * SEED_STRIDE (rank 0: the plain run's)
    shard(m)      --fsdp: the model sharded block by block (FSDP2's fully_shard), each rank holding 1/N
    recompute(m)  --activation_checkpointing: each block's activations recomputed in backward, not kept
    everywhere(f) --fsdp: flags true on every rank; most(n): the largest n of any rank (lock-step)

Under torchrun every rank samples and labels its share of each batch, all ranks train on the whole
batch's pairs (DDP averages the gradients of their shares; FSDP reduce-scatters them to the shards),
and rank 0 alone writes the run folder. gloo on a CPU (so the tests cover it), nccl on GPUs.

FSDP2 (--fsdp) is for models too big for one device: the policy, the reference and the reward model
are each sharded block by block, and a forward gathers one block's weights at a time. Every forward is
then a collective, so every rank must make the same forwards: the decode loop, the teacher-forced
scoring in chunks and the oracle's batches go on in lock-step until every rank is done
(everywhere, most), a rank with nothing left stepping on a row of filler. Without --fsdp those helpers
are the identity, and a run is what it was.
"""
import os
import types
from datetime import timedelta
from functools import partial

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

on, rank, nproc = False, 0, 1
fsdp = False        # --fsdp: the models sharded with FSDP2 (init sets it)
SEED_STRIDE = 1_000_003

def procs():
    """The number of processes torchrun started (1 without it): known before init, for the option checks."""
    return int(os.environ.get("WORLD_SIZE", 1))

def init(device, sharded=False):
    """Join torchrun's process group, if there is one; with `sharded` (--fsdp) in a plain run, a group
    of one (FSDP2 needs a group even for one device). -> the device this rank uses"""
    global on, rank, nproc, fsdp
    fsdp = sharded
    on = "RANK" in os.environ or sharded
    if not on:
        return device
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29511")):
        os.environ.setdefault(k, v)
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
    """The model the loss is taken through: DDP averages the ranks' gradients in backward() (a sharded
    model reduce-scatters them itself)."""
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model) if on and not fsdp else model

def blocks(model):
    """The model's transformer blocks: the classes a Hugging Face model names in _no_split_modules
    (GPT2Block, LlamaDecoderLayer...), the units FSDP shards and activation checkpointing recomputes."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in list(model.modules())[1:] if any(c.__name__ in names for c in type(m).__mro__)]   # FSDP's subclass too

def shard(model, bf16=False):
    """--fsdp: `model` sharded in place across the ranks by FSDP2, each block and then the whole. bf16:
    its forwards in bfloat16, its gradients reduced and its weights kept in float32 (MixedPrecisionPolicy).
    Without --fsdp, the model as it is."""
    if not fsdp:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    kw = dict(mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)) if bf16 else {}
    for m in blocks(model):
        fully_shard(m, **kw)
    fully_shard(model, **kw)
    return model

def recompute(model):
    """--activation_checkpointing: each block's forward, when it records a graph, keeps only its inputs;
    backward runs it again for the rest (torch.utils.checkpoint). A DPO step's activations grow with
    pairs x tokens x layers; this trades them for one more forward of the policy per step. The wrapper sits
    inside FSDP's hooks (they wrap the block's __call__, this its forward), so the recomputation finds
    the block's weights gathered, as FSDP2's own recipe has it. Sampling and evaluation record no graph
    and run the block as it is. The model, in place."""
    for m in blocks(model):
        m.forward = types.MethodType(recomputed, m)     # bound to m, so a deepcopy of the model binds its copy
    return model

def recomputed(block, *a, **k):
    """A block's forward under activation checkpointing (recompute)."""
    f = partial(type(block).forward, block)
    return checkpoint(f, *a, use_reentrant=False, **k) if torch.is_grad_enabled() else f(*a, **k)

def save_sharded(path, model, opt):
    """--fsdp: the model's and the optimizer's shards, each rank writing its own, with PyTorch's distributed
    checkpointing (a collective: every rank calls it). An optimizer that has not stepped yet has no state
    to save: asking for its state dict would make one, by a step that counts as AdamW's first."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict
    state = dict(zip(("model", "optim"), get_state_dict(model, opt))) if opt.state else {"model": get_model_state_dict(model)}
    dcp.save(state, checkpoint_id=path)

def load_sharded(path, model, opt, stepped):
    """save_sharded's shards back into `model` and (if it had `stepped`) `opt`: tensors through
    torch.load(weights_only=True), the index through an unpickler that builds only the classes such an
    index holds, so that loading runs no foreign code (a file that asks for anything else raises UserError)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict
    reader = _reader(path)
    reader.read_metadata()           # refused here, in one line, before torch.distributed.checkpoint reads anything
    state = dict(zip(("model", "optim"), get_state_dict(model, opt))) if stepped else {"model": get_model_state_dict(model)}
    dcp.load(state, storage_reader=reader)
    if stepped:
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        set_model_state_dict(model, state["model"])

def _reader(path):
    import pickle

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta
    from errors import UserError

    class Index(pickle.Unpickler):
        def find_class(self, module, name):
            ok = (module in ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
                  or (module, name) in (("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                                        ("pathlib", "PurePosixPath"), ("collections", "OrderedDict"))
                  or module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
            if not ok:
                raise UserError(f"{path}/.metadata asks for {module}.{name}, which a checkpoint's index does not hold "
                                f"-- it was not written by train.py, and is not read")
            return super().find_class(module, name)

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            with open(os.path.join(path, ".metadata"), "rb") as f:
                metadata = Index(f).load()
            metadata.storage_meta = getattr(metadata, "storage_meta", None) or StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata
    return Reader(path)

def full_state(model):
    """--fsdp: the model's whole state dict, gathered to rank 0 (in CPU memory; an empty dict on the other
    ranks; a collective); None without --fsdp (the model's own save_pretrained has it all)."""
    if not fsdp:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

def barrier():
    if on:
        dist.barrier()

def on_this_rank(model):
    """(parameters of the whole model, bytes of them this rank holds): all of them, or its shards."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    return sum(p.numel() for p in model.parameters()), sum(p.numel() * p.element_size() for p in local)

def full(x):
    """A sharded (DTensor) value whole, e.g. a gradient norm of sharded gradients; anything else as it is."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x

def inference():
    """torch.inference_mode(), the fastest way to run a model without gradients; torch.no_grad() under
    --fsdp, whose gathered weights are reused by the training step (an inference-mode tensor cannot be)."""
    return torch.no_grad() if fsdp else torch.inference_mode()

def everywhere(flags):
    """--fsdp: each flag true on every rank (the lock-step of collective forwards); the flags otherwise."""
    if not fsdp:
        return flags
    t = torch.tensor(flags, dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t.bool().tolist()

def most(n):
    """--fsdp: the largest n of any rank (how many collective forwards every rank makes); n otherwise."""
    if not fsdp:
        return n
    t = torch.tensor(n)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)

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
