"""
What sampling and a DPO step cost, measured side by side (in the tradition of nanoGPT's bench.py):

    (a) tokens/s of sample.generate against Hugging Face model.generate(do_sample=True, top_k=0), one model
    (b) a PILAF pair batch against a Vanilla pair batch: wall time, next to Table 1's 3/2 = 1.5; and the
        same batches' model calls alone, the floor under any loop that keeps the models' own forward
    (c) pi+ decoding with the KV cache against sample.slow_generate, the plain loop that re-reads the
        whole prefix through both models (the loop generate must equal);
        and one step of each at the mean prefix, to show what the cache saves in work against in time
    (d) one DPO step (policy forward + backward, reference forward): peak memory and time, ours against
        the textbook version (full logits over prompt and response, a float32 log_softmax, two forwards),
        the step this repo had before (the same in one forward over chosen and rejected stacked), and
        ours in one stacked forward (the choice dpo.pair_logps made against)
    (e) GPT-2 small (all 12 layers) on 2 processes, sharded (--fsdp) against DDP: the peak memory per
        rank, and the time of a DPO step and of a PILAF pair batch (what sharding costs on this machine)

    python bench.py                        # both sizes on the CPU: about 25 minutes on 2 cores
    python bench.py --size world           # the embedded world's model size only (about a minute)
    python bench.py --device cuda --reps 10

Models are randomly initialised GPT-2s (no download): the embedded world's shape (2 layers, width 64,
74 words) and GPT-2 small's (124M, 50257 tokens). Prompts are random token ids of varied lengths,
left-padded; EOS is switched off so every case decodes the same number of tokens. Each comparison
runs its cases interleaved (A B A B ...) on the same inputs after a warm-up and reports medians, so a
machine whose speed drifts still gives a fair ratio. The slow GPT-2 cases, the loop without a cache and
the DPO step, take 2 repetitions. Each DPO-step case runs one step in a child process of its own
(children interleaved) and reports the rise of its peak resident memory (on CUDA, max_memory_allocated).
"""
import omp  # noqa: F401  (first: how the CPU threads wait, set before torch loads; omp.py says why)

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from functools import partial
from types import SimpleNamespace

import torch
import torch.nn.functional as F
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

import dpo
import pilaf
import errors
from sample import generate, positions, slow_generate

# -----------------------------------------------------------------------------
# the shapes measured; GPT-2 small's DPO step keeps 2 of its 12 layers (the vocabulary is what matters there)
SIZES = dict(
    world=dict(model=dict(vocab_size=74, n_positions=64, n_layer=2, n_head=4, n_embd=64),
               prompt_len=12, new=32, sample_prompts=32, pair_prompts=[32], nocache_prompts=32, nocache_new=32,
               dpo=dict(pairs=32, prompt_len=12, resp_len=32, n_layer=2)),
    gpt2=dict(model=dict(),  # GPT2Config's defaults are GPT-2 small
              prompt_len=16, new=32, sample_prompts=16, pair_prompts=[8, 32], nocache_prompts=8, nocache_new=64,
              dpo=dict(pairs=8, prompt_len=256, resp_len=128, n_layer=2)),
)
BETA = 0.1
NO_EOS = -1   # an id no model emits: every row decodes the full length

die = partial(errors.die, prog="bench.py")   # bad input: one line naming the fix, exit code 2

def get_args(argv=None):
    p = argparse.ArgumentParser(description="Sampling and DPO-step cost, side by side.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = die
    p.add_argument("--size", default="all", choices=["all", *SIZES], help="model shapes to measure")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions per case (the median is reported)")
    p.add_argument("--dpo_case", default=None, help=argparse.SUPPRESS)   # internal: one DPO-step case in a child
    p.add_argument("--dist_case", default=None, help=argparse.SUPPRESS)  # internal: (e) under torchrun, fsdp, ddp or fsdp+ac
    args = p.parse_args(argv)
    if args.device.split(":")[0] not in ("cpu", "cuda") or args.device.startswith("cuda") and not torch.cuda.is_available():
        die(f"--device {args.device} is not available here -- use --device cpu")
    if args.reps < 1:
        die(f"--reps must be positive (got {args.reps})")
    return args

def slow_reps(size, args):
    """A no-cache GPT-2 run takes over a minute on a CPU: two repetitions of the slow cases."""
    return min(args.reps, 2) if size == "gpt2" else args.reps

def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()

def model(cfg, device, seed, **over):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**{**cfg, **over})).to(device).eval()

def prompts(n, length, vocab, device, seed=0):
    """n random prompts of length/2..length tokens, left-padded -> ids, mask (n, length)"""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(length // 2, length + 1, (n,), generator=g)
    mask = (torch.arange(length) >= length - lens[:, None]).long()
    ids = torch.randint(0, vocab, (n, length), generator=g) * mask
    return ids.to(device), mask.to(device)

def race(cases, reps, device):
    """Each case once to warm up, then `reps` rounds of every case in turn. -> {name: median seconds}"""
    for fn in cases.values():
        fn(warm=True)
    times = {k: [] for k in cases}
    for _ in range(reps):
        for k, fn in cases.items():
            sync(device)
            t = time.perf_counter()
            fn(warm=False)
            sync(device)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}

def gen_kw(new, seed, device):
    return dict(max_new_tokens=new, eos_id=NO_EOS, pad_id=0, temperature=1.0,
                generator=torch.Generator(device).manual_seed(seed))

@torch.inference_mode()
def calls(steps, ids, mask, new):
    """A decode loop's model calls and nothing else (token 0 fed back, no mixing, no draw): the floor under
    any loop that steps these models with their own forward. steps: [(model, its rows as a slice)]"""
    B, P = ids.shape
    caches = [None] * len(steps)
    attn = torch.cat([mask, torch.ones(B, new, dtype=mask.dtype, device=mask.device)], 1)   # (B, P + new)
    x, pos = ids, positions(mask)
    for t in range(new):
        for i, (m, r) in enumerate(steps):
            caches[i] = m(input_ids=x[r], attention_mask=attn[r, :P + t], position_ids=pos[r], cache=caches[i],
                          use_cache=True, logits_to_keep=1).cache
        x, pos = torch.zeros_like(ids[:, :1]), pos[:, -1:] + 1

# -----------------------------------------------------------------------------
# (a) (b) (c): sampling

def bench_sampling(size, args):
    S, dev = SIZES[size], args.device
    pol, ref = model(S["model"], dev, 1), model(S["model"], dev, 2)
    V = pol.config.vocab_size
    pol.generation_config.eos_token_id = None     # HF generate: no EOS either, the full length every time
    ids, mask = prompts(S["sample_prompts"], S["prompt_len"], V, dev)
    n = lambda warm: 2 if warm else S["new"]
    t = race({"ours": lambda warm: generate([pol], (1.0,), ids, mask, **gen_kw(n(warm), 0, dev)),
              "hf": lambda warm: pol.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0,
                                              temperature=1.0, max_new_tokens=n(warm),
                                              pad_token_id=0)}, args.reps, dev)
    tokens = S["sample_prompts"] * S["new"]
    yield (size, f"(a) sampling, one model, {S['sample_prompts']} prompts x {S['new']} tokens",
                 f"{tokens / t['ours']:8.0f} tok/s", f"{tokens / t['hf']:8.0f} tok/s", t["hf"] / t["ours"], ">= 1.1x faster")

    for B in S["pair_prompts"]:
        ids, mask = prompts(B, S["prompt_len"], V, dev)
        # a seed whose coin (pilaf's first draw) gives B//2 (pi+, pi-) pairs: Table 1's average cost (exactly, for an even B)
        want = 2 * B + 2 * (B // 2)
        seed = next((s for s in range(1000) if pilaf.pilaf(pol, ref, ids, mask, BETA, gen_kw(1, s, dev))["forwards"] == want), None)
        if seed is None:
            die(f"no seed below 1000 gives {B // 2} (pi+, pi-) pairs in a batch of {B} -- change pair_prompts in SIZES")
        fwd = want / (2 * B)                                              # Table 1's cost ratio
        # the same batches' model calls alone: the policy on all 2B rows, the reference on the B pi+- rows. The
        # floor of any loop that steps the models with their own forward, whatever it does between the calls
        p_ids, p_mask = ids.repeat(2, 1), mask.repeat(2, 1)
        everything, pm = slice(0, 2 * B), slice(0, B)
        floor = race({"pilaf": lambda warm: calls([(pol, everything), (ref, pm)], p_ids, p_mask, n(warm)),
                      "vanilla": lambda warm: calls([(pol, everything)], p_ids, p_mask, n(warm))}, args.reps, dev)
        t = race({s: (lambda warm, s=s: getattr(pilaf, s)(pol, ref, ids, mask, BETA, gen_kw(n(warm), seed, dev)))
                  for s in ("pilaf", "vanilla")}, args.reps, dev)
        low = floor["pilaf"] / floor["vanilla"]
        target = f"<= {1.05 * low:.2f}x (floor + 5%)" if size == "world" else "<= 1.6x" if B >= 32 else ""
        yield (size, f"(b) PILAF / Vanilla pair batch, {B} prompts x {S['new']} tokens (forwards {fwd:.2f}x)",
                     f"{t['pilaf']:8.3f} s", f"{t['vanilla']:8.3f} s", t["pilaf"] / t["vanilla"], target)
        yield (size, "    (b) the same batches' model calls alone: no mixing, no draw (the floor)",
                     f"{floor['pilaf']:8.3f} s", f"{floor['vanilla']:8.3f} s", low, "")

    ids, mask = prompts(S["nocache_prompts"], S["prompt_len"], V, dev)
    new = lambda warm: 2 if warm else S["nocache_new"]
    t = race({"cache": lambda warm: generate([pol, ref], (1 + BETA, -BETA), ids, mask, **gen_kw(new(warm), 0, dev)),
              "nocache": lambda warm: slow_generate([pol, ref], (1 + BETA, -BETA), ids, mask, new(warm), NO_EOS, 0,
                                                    generator=torch.Generator(dev).manual_seed(0))}, slow_reps(size, args), dev)
    yield (size, f"(c) pi+ with KV cache / without, {S['nocache_prompts']} prompts x {S['nocache_new']} tokens",
                 f"{t['cache']:8.3f} s", f"{t['nocache']:8.3f} s", t["nocache"] / t["cache"], "")
    # why the gap is what it is: one step of each loop at the mean prefix, the policy alone. Without a cache the
    # step reads L tokens per row instead of 1, but L times the tokens costs far less than L times the time
    # wherever a forward on few rows cannot keep the arithmetic units busy
    L = S["prompt_len"] + S["nocache_new"] // 2
    ids, mask = prompts(S["nocache_prompts"], L, V, dev, seed=1)
    pos = positions(mask)
    with torch.inference_mode():
        cache = pol(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1], use_cache=True).cache
    k = 10   # steps a repetition: one step alone is too short to time

    def step(warm, cached):
        with torch.inference_mode():
            for _ in range(k):
                if cached:   # the new token against the cached prefix; the cache is cut back to the prefix after
                    pol(input_ids=ids[:, -1:], attention_mask=mask, position_ids=pos[:, -1:], cache=cache,
                        use_cache=True, logits_to_keep=1)
                    cache.crop(-1)
                else:
                    pol(input_ids=ids, attention_mask=mask, position_ids=pos)
    t = race({"cache": lambda warm: step(warm, True), "nocache": lambda warm: step(warm, False)}, args.reps, dev)
    yield (size, f"    (c) one policy step, {S['nocache_prompts']} rows x {L} tokens: {L}x the tokens without a cache",
                 f"{t['cache'] / k:8.4f} s", f"{t['nocache'] / k:8.4f} s", t["nocache"] / t["cache"], "")

# -----------------------------------------------------------------------------
# (d): one DPO step

def full_logits_logps(m, prompt_ids, prompt_mask, resp_ids, resp_mask):
    """Logits at every position, a float32 log_softmax over all of them, then the response tokens."""
    ids, attn = torch.cat([prompt_ids, resp_ids], 1), torch.cat([prompt_mask, resp_mask], 1)
    logits = m(input_ids=ids, attention_mask=attn, position_ids=positions(attn)).logits
    lp = F.log_softmax(logits.float(), -1)[:, prompt_ids.shape[1] - 1:-1]
    return (lp.gather(2, resp_ids[:, :, None]).squeeze(-1) * resp_mask).sum(-1)

def stacked(logps):
    """Chosen and rejected in one forward over the 2B rows stacked (eric-mitchell's concatenated_forward)."""
    def both(m, p, pm, c, cm, r, rm):
        return logps(m, p.repeat(2, 1), pm.repeat(2, 1), torch.cat([c, r]), torch.cat([cm, rm])).chunk(2)
    return both

DPO_CASES = {
    "textbook": lambda m, p, pm, c, cm, r, rm: (full_logits_logps(m, p, pm, c, cm), full_logits_logps(m, p, pm, r, rm)),
    "previous": stacked(full_logits_logps),          # this repo's step before bench.py
    "ours, one stacked forward": stacked(dpo.sequence_logps),
    "ours": dpo.pair_logps,                          # response-only logits, two forwards
}

def dpo_step(case, pol, ref, batch):
    pc, pr = DPO_CASES[case](pol, *batch)
    with torch.no_grad():
        rc, rr = DPO_CASES[case](ref, *batch)
    losses, _, _ = dpo.dpo_loss(pc, pr, rc, rr, BETA)
    losses.mean().backward()
    pol.zero_grad(set_to_none=True)

def dpo_child(args):
    """One DPO step of one case in this process: print its time and the rise of peak memory, as JSON."""
    import resource
    size, case = args.dpo_case.split(":", 1)
    S, dev = SIZES[size], args.device
    D = S["dpo"]
    pol = model(S["model"], dev, 1, n_layer=D["n_layer"]).train()
    ref = model(S["model"], dev, 2, n_layer=D["n_layer"])
    V = pol.config.vocab_size
    p, pm = prompts(D["pairs"], D["prompt_len"], V, dev, seed=1)
    c, r = (torch.randint(0, V, (D["pairs"], D["resp_len"]), generator=torch.Generator().manual_seed(s)).to(dev) for s in (2, 3))
    cm = (torch.arange(D["resp_len"]) < torch.randint(D["resp_len"] // 2, D["resp_len"] + 1, (D["pairs"], 1))).long().to(dev)
    peak = lambda: (torch.cuda.max_memory_allocated() if dev.startswith("cuda")
                    else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)   # bytes (Linux reports KiB)
    sync(dev)
    base = torch.cuda.memory_allocated() if dev.startswith("cuda") else peak()
    t = time.perf_counter()
    dpo_step(case, pol, ref, (p, pm, c, cm, r, cm.flip(0)))
    sync(dev)
    print(json.dumps(dict(time=time.perf_counter() - t, mem=peak() - base)))

def bench_dpo(size, args):
    """Each case in a fresh child process (a process's peak memory only grows); children interleaved."""
    got = {c: [] for c in DPO_CASES}
    for _ in range(slow_reps(size, args)):
        for c in DPO_CASES:
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--device", args.device,
                                  "--dpo_case", f"{size}:{c}"], capture_output=True, text=True, check=True)
            got[c].append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {c: {k: statistics.median(x[k] for x in got[c]) for k in ("time", "mem")} for c in DPO_CASES}
    D = SIZES[size]["dpo"]
    mib = lambda c: f"{med[c]['mem'] / 2**20:8.0f} MiB"
    sec = lambda c: f"{med[c]['time']:8.2f} s"
    what = f"{D['pairs']} pairs, {D['prompt_len']}+{D['resp_len']} tokens, {D['n_layer']} layers"
    yield from [(size, f"(d) DPO step peak memory, {what}", mib("ours"), mib("textbook"), med["ours"]["mem"] / med["textbook"]["mem"], ""),
            (size, "    (d) the same, against the previous step", mib("ours"), mib("previous"),
             med["ours"]["mem"] / med["previous"]["mem"], "<= 0.6x" if size == "gpt2" else ""),
            (size, "    (d) the step's time, against the textbook's", sec("ours"), sec("textbook"),
             med["ours"]["time"] / med["textbook"]["time"], ""),
            (size, "    (d) ours in one stacked forward: memory, against ours", mib("ours, one stacked forward"), mib("ours"),
             med["ours, one stacked forward"]["mem"] / med["ours"]["mem"], ""),
            (size, "    (d) ours in one stacked forward: time, against ours", sec("ours, one stacked forward"), sec("ours"),
             med["ours, one stacked forward"]["time"] / med["ours"]["time"], "")]

# -----------------------------------------------------------------------------
# (e): FSDP against DDP, two processes

SHARDED = dict(prompt_len=64, resp_len=32, pairs=4, sample_prompts=4, new=16)   # per rank; GPT-2 small, all 12 layers

def dist_child(args):
    """Under torchrun: GPT-2 small policy and reference, sharded (--dist_case fsdp; fsdp+ac: with the policy's
    activations recomputed, --activation_checkpointing) or whole (ddp); one DPO
    step after a warm-up, then one PILAF pair batch, timed; the rise of peak memory over the ranks (JSON, rank 0)."""
    import resource
    import ddp
    ddp.init(args.device, sharded=args.dist_case != "ddp")
    peak = lambda: (torch.cuda.max_memory_allocated() if args.device.startswith("cuda")
                    else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    base = peak()
    pol = model({}, args.device, 1).train()
    pol = ddp.shard(ddp.recompute(pol) if args.dist_case == "fsdp+ac" else pol)
    ref = ddp.shard(model({}, args.device, 2).requires_grad_(False))
    net, opt = ddp.wrap(pol), torch.optim.AdamW(pol.parameters(), lr=1e-5)
    S, V = SHARDED, pol.config.vocab_size
    p, pm = prompts(S["pairs"], S["prompt_len"], V, args.device, seed=1 + ddp.rank)
    c, r = (torch.randint(0, V, (S["pairs"], S["resp_len"]), generator=torch.Generator().manual_seed(s + ddp.rank)).to(args.device)
            for s in (2, 3))
    m = torch.ones_like(c)

    def step():
        pc, pr = dpo.pair_logps(net, p, pm, c, m, r, m)
        with torch.no_grad():
            rc, rr = dpo.pair_logps(ref, p, pm, c, m, r, m)
        dpo.dpo_loss(pc, pr, rc, rr, BETA)[0].mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    times = race({"step": lambda warm: step(),
                  "pilaf": lambda warm: pilaf.pilaf(pol, ref, p, pm, BETA, gen_kw(S["new"], 0, args.device))}, 1, args.device)
    got = ddp.everyone(dict(times, mem=peak() - base))
    if ddp.rank == 0:
        print(json.dumps({k: max(g[k] for g in got) for k in got[0]}))
    ddp.close(SimpleNamespace(model=None))

def bench_dist(args):
    """(e): FSDP and DDP, each a torchrun of 2 processes, alternated; medians of the per-rank maxima."""
    got = {c: [] for c in ("fsdp", "ddp", "fsdp+ac")}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for _ in range(args.reps):
        for c in got:
            out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                  os.path.abspath(__file__), "--device", args.device, "--dist_case", c],
                                 capture_output=True, text=True, check=True, env=env)
            got[c].append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {c: {k: statistics.median(x[k] for x in got[c]) for k in ("step", "pilaf", "mem")} for c in got}
    S = SHARDED
    yield from [("gpt2", "(e) peak memory per rank, FSDP against DDP, 2 processes (GPT-2 small, 12 layers, AdamW)",
                 f"{med['fsdp']['mem'] / 2**20:8.0f} MiB", f"{med['ddp']['mem'] / 2**20:8.0f} MiB",
                 med["fsdp"]["mem"] / med["ddp"]["mem"], "~0.5x of the states"),
                ("gpt2", f"    (e) a DPO step ({S['pairs']} pairs a rank, {S['prompt_len']}+{S['resp_len']} tokens)",
                 f"{med['fsdp']['step']:8.2f} s", f"{med['ddp']['step']:8.2f} s", med["fsdp"]["step"] / med["ddp"]["step"], ""),
                ("gpt2", f"    (e) a PILAF pair batch ({S['sample_prompts']} prompts a rank x {S['new']} tokens)",
                 f"{med['fsdp']['pilaf']:8.2f} s", f"{med['ddp']['pilaf']:8.2f} s", med["fsdp"]["pilaf"] / med["ddp"]["pilaf"], ""),
                ("gpt2", "    (e) peak memory per rank, FSDP with activation checkpointing against FSDP",
                 f"{med['fsdp+ac']['mem'] / 2**20:8.0f} MiB", f"{med['fsdp']['mem'] / 2**20:8.0f} MiB",
                 med["fsdp+ac"]["mem"] / med["fsdp"]["mem"], ""),
                ("gpt2", "    (e) a DPO step, FSDP with activation checkpointing against FSDP",
                 f"{med['fsdp+ac']['step']:8.2f} s", f"{med['fsdp']['step']:8.2f} s", med["fsdp+ac"]["step"] / med["fsdp"]["step"], "")]

def hardware(device):
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    name = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            name = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {torch.get_num_threads()} threads"

def main(argv=None):
    args = get_args(argv)
    transformers.logging.set_verbosity_error()
    if args.dpo_case:
        return dpo_child(args)
    if args.dist_case:
        return dist_child(args)
    print(f"bench.py | {hardware(args.device)} | torch {torch.__version__} | medians of interleaved repetitions "
          f"({args.reps}; 2 for the slow GPT-2 cases)")
    busy = os.getloadavg()[0]                 # processes running or waiting, over the last minute
    if args.device == "cpu" and busy > (os.cpu_count() or 1) - torch.get_num_threads() + 0.75:   # another busy process
        print(f"warning: the machine is busy (load {busy:.1f} on {os.cpu_count()} cores, and this bench runs "
              f"{torch.get_num_threads()} threads): ratios measured now mean little; run it on an idle machine")
    print(f"{'size':6} {'comparison':78} {'ours':>14} {'against':>14} {'ratio':>7}  target")
    for size in (SIZES if args.size == "all" else [args.size]):
        two = args.device == "cpu" or torch.cuda.device_count() >= 2     # (e) needs two processes, each a device
        for bench in (bench_sampling, bench_dpo) + ((lambda size, args: bench_dist(args)),) * (size == "gpt2" and two):
            for size_, what, ours, other, ratio, target in bench(size, args):
                print(f"{size_:6} {what:78} {ours:>14} {other:>14} {ratio:6.2f}x  {target}", flush=True)
    print("ratio: (a) HF time / ours; (b) PILAF / Vanilla time; (c) no-cache / cached time; (d) ours / the other; "
          "(e) FSDP / DDP. "
          "What they mean: docs/performance.md.")

if __name__ == "__main__":
    main()
