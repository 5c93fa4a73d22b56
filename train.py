"""
Online and iterative DPO with a choice of pair sampler. main() at the bottom is the whole algorithm:

    for each round:
        collect    draw prompts -> the sampler makes pairs of responses with the current (frozen)
                   policy -> the oracle labels each pair (chosen / rejected) -> appended to <out>/pairs.jsonl
        update     DPO on those pairs, the reference fixed to the initial model (--reference
                   behavior: to the frozen policy that sampled them, as in BPO)
        evaluate   every --eval_every labels: reward, KL, J on held-out prompts -> <out>/metrics.jsonl
        save       every --save_every labels: a checkpoint (checkpoint.py), so --resume can continue

online DPO:    one round per step: --batch_size fresh pairs, one gradient step on them
iterative DPO: --iterations rounds of --labels/--iterations pairs, --epochs passes over each;
               the first round is Vanilla for every sampler (paper Sec. 6.1)

    python train.py --sampler pilaf                       # the embedded world: under a minute on 2 CPU cores
    python train.py --resume out/pilaf-online-s0          # continue a killed run; its labels are reused
    python train.py --from_pairs out/pilaf-online-s0/pairs.jsonl --beta 0.2 --out out/beta0.2   # paid labels, new beta
    python train.py --policy gpt2 --oracle <rm folder> --prompts imdb --prompt_format imdb --prompt_column text
    torchrun --standalone --nproc_per_node 2 train.py --sampler pilaf    # the same loop on 2 processes (DDP)
"""
import omp  # noqa: F401  (first: how the CPU threads wait, set before torch loads; omp.py says why)

import argparse
import copy
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from datetime import timedelta
from functools import partial
from types import SimpleNamespace

import torch
import torch.distributed as dist
import transformers
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import checkpoint
import world
from dpo import LOSSES, dpo_loss, kl_estimates, pair_logps, reward_metrics
from oracle import Oracle, Person
from pilaf import SAMPLERS
from sample import generate

# ---- torchrun (DDP): main() sets these from the environment. A plain `python train.py` is rank 0 of 1
# and runs none of the lines marked `if ddp`. Under torchrun every rank samples and labels its share of
# each batch, all ranks train on the whole batch's pairs (DDP averages the gradients of their shares),
# and rank 0 alone writes the run folder.
ddp, rank, nproc = False, 0, 1
SEED_STRIDE = 1_000_003   # rank r's generators start from seed + r * SEED_STRIDE (rank 0: the plain run's)

def leave(line, code):
    """End the run with one line on stderr. Under torchrun every rank comes to the same end: rank 0
    says it and exits; the others wait, and torchrun stops them once rank 0 has exited (a rank that
    left first would have torchrun stop rank 0 before its line was out)."""
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr)
    else:
        time.sleep(60)                          # torchrun ends this wait as soon as rank 0 has exited
    sys.exit(code)

def die(msg):
    """Bad input: one line naming the fix, exit code 2 (like argparse), nothing else."""
    leave(f"train.py: error: {msg}", 2)

# -----------------------------------------------------------------------------
# options, all checked before the world is built, any weights load or anything is written

def parser():
    p = argparse.ArgumentParser(description="Online / iterative DPO with PILAF and baseline pair samplers.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = die   # one line instead of usage + error
    g = p.add_argument_group("algorithm")
    g.add_argument("--sampler", default="pilaf", choices=list(SAMPLERS), help="how pairs are drawn (pilaf.py)")
    g.add_argument("--mode", default="online", choices=["online", "iterative"], help="fresh pairs every step, or K collect-then-train rounds")
    g.add_argument("--beta", type=float, default=0.1, help="DPO beta; also PILAF's interpolation weight and the KL weight in J")
    g.add_argument("--n", type=int, default=8, help="best_of_n: candidates per prompt")
    g.add_argument("--xpo_alpha", type=float, default=0.0, help="hybrid: XPO exploration term alpha*log pi(y_ref) added to the loss (0 = plain DPO)")
    g.add_argument("--loss", default="dpo", choices=LOSSES, help="dpo: -log sigmoid(beta*D); ipo: (D - 1/(2 beta))^2; hinge: max(0, 1 - beta*D), D the log-ratio margin")
    g.add_argument("--reference", default="initial", choices=["initial", "behavior"], help="what the loss anchors to: the initial model, or (BPO) the policy that sampled the round's pairs; KL and J always use the initial model")
    g.add_argument("--label", default="bt", choices=["bt", "argmax"], help="oracle labels: Bradley-Terry draw, or always the higher score")
    g = p.add_argument_group("budget")
    g.add_argument("--labels", type=int, default=4096, help="preference labels in total (the annotation budget)")
    g.add_argument("--batch_size", type=int, default=32, help="pairs per DPO step (online: also per round)")
    g.add_argument("--iterations", type=int, default=4, help="iterative: collect-then-train rounds")
    g.add_argument("--epochs", type=int, default=2, help="iterative: passes over each round's pairs")
    g.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate")
    g.add_argument("--max_new_tokens", type=int, default=32, help="longest response")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0 = greedy)")
    g = p.add_argument_group("models and data (default: the embedded world, built offline on first use)")
    g.add_argument("--world", default=world.DEFAULT_DIR, help="where the embedded world is cached")
    g.add_argument("--policy", default=None, help="reference / initial policy: causal LM name or folder")
    g.add_argument("--init_from", default=None, help="start the policy from this checkpoint instead (reference stays --policy)")
    g.add_argument("--oracle", default=None, help="reward model (sequence classifier) name or folder; 'human': you label the pairs in this terminal")
    g.add_argument("--judge", default=None, help="with --oracle human: the reward model that scores the evaluations and your agreement with it (default: the embedded world's oracle)")
    g.add_argument("--oracle_format", default="auto", choices=["auto", "chat", "plain"], help="what the oracle reads: its chat template applied to [user: prompt, assistant: response], or prompt + ' ' + response; auto = chat when its tokenizer has a template")
    g.add_argument("--prompts", default=None, help="prompt data set: name or a saved DatasetDict folder")
    g.add_argument("--prompt_column", default="prompt", help="column holding the prompt text")
    g.add_argument("--prompt_format", default="raw", choices=list(world.FORMATS), help="hh: cut HH-RLHF dialogues at the last assistant turn; imdb: first words of a review")
    g.add_argument("--train_split", default="train", help="split the training prompts come from")
    g.add_argument("--test_split", default="test", help="held-out split for evaluation")
    g.add_argument("--from_pairs", default=None, help="train on the labelled pairs of this pairs.jsonl, in their order, instead of sampling and labelling new ones")
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--eval_every", type=int, default=512, help="evaluate after every this many labels (and at start and end)")
    g.add_argument("--eval_prompts", type=int, default=64, help="held-out prompts per evaluation (at most the split's size)")
    g.add_argument("--eval_samples", type=int, default=8, help="policy samples per held-out prompt")
    g.add_argument("--save_every", type=int, default=512, help="checkpoint after every this many labels (and at start and end)")
    g.add_argument("--out", default=None, help="run folder (default out/<sampler>-<mode>-s<seed>)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    g.add_argument("--resume", default=None, metavar="RUN", help="continue the run in this folder from its last checkpoint, with its saved options")
    g.add_argument("--seed", type=int, default=0, help="seeds prompts, sampling, labels and init")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model weights")
    return p

def get_args(argv=None):
    args = parser().parse_args(argv)
    if args.resume:
        return resume_args(argv, args.resume)
    check_options(args)
    args.out = args.out or os.path.join("out", f"{args.sampler}-{args.mode}-s{args.seed}")
    if os.path.exists(os.path.join(args.out, "pairs.jsonl")) and not args.overwrite:
        die(f"{args.out} already holds a run (its labels would be lost) -- pass --resume {args.out} to continue it, "
            f"another --out, or --overwrite")
    return args

def check_options(args):
    for name in ["labels", "batch_size", "iterations", "epochs", "max_new_tokens", "n", "eval_every", "eval_prompts",
                 "eval_samples", "save_every"]:
        if getattr(args, name) <= 0:
            die(f"--{name} must be positive (got {getattr(args, name)})")
    if args.beta <= 0:
        die(f"--beta must be > 0 (got {args.beta}); the paper uses 0.1")
    if args.lr <= 0 or args.temperature < 0 or args.xpo_alpha < 0:
        die("--lr must be > 0, --temperature and --xpo_alpha >= 0")
    if args.n < 2:
        die("--n must be at least 2: best_of_n labels its best and worst of n candidates")
    if args.mode == "online" and args.labels % args.batch_size:
        die(f"--labels ({args.labels}) must be a multiple of --batch_size ({args.batch_size}) in online mode")
    if args.mode == "iterative" and args.labels % args.iterations:
        die(f"--labels ({args.labels}) must be a multiple of --iterations ({args.iterations})")
    if args.device.startswith("cuda") and not torch.cuda.is_available() or args.device.split(":")[0] not in ("cpu", "cuda"):
        die(f"--device {args.device} is not available here -- use --device cpu")
    if args.xpo_alpha and args.sampler != "hybrid":
        die("--xpo_alpha applies to --sampler hybrid only")
    procs, per_round = int(os.environ.get("WORLD_SIZE", 1)), args.batch_size if args.mode == "online" else args.labels // args.iterations
    if args.batch_size % procs or per_round % procs:
        die(f"--batch_size ({args.batch_size}) and the pairs per round ({per_round}) must split evenly across the "
            f"{procs} processes -- pick a --batch_size and --labels that are multiples of {procs}")
    if args.from_pairs and args.reference == "behavior":
        die("--reference behavior anchors to the policy that sampled the pairs, which --from_pairs does not have "
            "-- use --reference initial")
    if args.judge and args.oracle != "human":
        die("--judge scores the evaluations when a person labels (--oracle human); otherwise --oracle does -- leave out --judge")
    if args.oracle == "human" and (procs > 1 or args.from_pairs):
        die("--oracle human labels in one terminal: run it with plain python train.py, without --from_pairs")
    if args.from_pairs and not os.path.isfile(args.from_pairs):
        die(f"--from_pairs {args.from_pairs}: no such file -- pass the pairs.jsonl of a run")

def resume_args(argv, run):
    """The saved options of the run in folder `run`; options given again must agree with them."""
    if not os.path.isfile(os.path.join(run, "config.json")):
        die(f"--resume {run}: no config.json there -- pass the --out folder of a run")
    if os.path.exists(os.path.join(run, "summary.json")):
        die(f"--resume {run}: that run has finished (summary.json) -- start a new one with another --out")
    if checkpoint.latest(run) is None:
        die(f"--resume {run}: no checkpoint yet (it was stopped while starting) -- run it again with --overwrite")
    with open(os.path.join(run, "config.json")) as f:
        saved = json.load(f)
    given = parser()
    for a in given._actions:            # a parser that returns only the options actually typed
        a.default = argparse.SUPPRESS
    typed = vars(given.parse_args(argv))
    typed.pop("resume")
    for k, v in typed.items():
        if saved.get(k) != v and not (k == "out" and os.path.abspath(v) == os.path.abspath(run)):
            die(f"--resume continues with the run's saved options: --{k} {v} contradicts its {k}={saved.get(k)!r} "
                f"-- leave --{k} out, or start a new run (--from_pairs {run}/pairs.jsonl reuses its labels)")
    return argparse.Namespace(**dict(saved, out=run, resume=run))

# -----------------------------------------------------------------------------
# the world: models, oracle and prompts

def check_names(args):
    """Every model and data set the user named, checked before the embedded world is built (4 minutes
    on a fresh machine) or any weights load. Returns the named prompts, or None for the world's."""
    for what, name in (("policy", args.policy), ("oracle", getattr(args, scorer(args))), ("--init_from checkpoint", args.init_from)):
        if name:
            world.check_name(what, name)
    if args.prompts:
        return world.load_prompts(args.prompts, args.prompt_column, args.prompt_format, args.train_split, args.test_split)
    if args.prompt_column != world.PROMPT_COLUMN:
        raise world.WorldError(f"the embedded world's prompts have no column '{args.prompt_column}' -- "
                               f"leave out --prompt_column (it is '{world.PROMPT_COLUMN}'), or pass --prompts")
    return None

def scorer(args):
    """The option naming the reward model that scores: --oracle, or with --oracle human --judge."""
    return "judge" if args.oracle == "human" else "oracle"

def load(args, start_from=None):
    """Reference policy, trained policy (from `start_from`, --init_from or the reference), tokenizer,
    oracle, prompts and the ids that end a response. Bad names exit 2 with one line."""
    try:
        prompts = check_names(args)
        rm = scorer(args)
        if None in (args.policy, getattr(args, rm), args.prompts):
            if args.policy:   # a hub policy with the toy world's oracle and prompts is rarely what was meant
                missing = [k for k in (rm, "prompts") if getattr(args, k) is None]
                print(f"note: --policy given without --{' or --'.join(missing)}: using the embedded world's "
                      f"{' and '.join(missing)} (from {args.world})")
            wdir = world.ensure(args.world)
            args.policy = args.policy or os.path.join(wdir, "policy")
            setattr(args, rm, getattr(args, rm) or os.path.join(wdir, "oracle"))
            args.prompts = args.prompts or os.path.join(wdir, "prompts")
        cfg = world.check_name("policy", args.policy)
        train_prompts, test_prompts = prompts or world.load_prompts(args.prompts, args.prompt_column, args.prompt_format,
                                                                    args.train_split, args.test_split)
        tok = world.load_policy_tokenizer(args.policy)
        source = read_pairs(args.from_pairs, cfg.vocab_size, args.labels) if args.from_pairs else None
        train_prompts, test_prompts = fit_context(args, tok, cfg, train_prompts, test_prompts)
        dtype = getattr(torch, args.dtype)
        ref, _ = world.load_policy(args.policy, dtype)
        # the trained weights stay float32 (bf16 would round most AdamW steps away); bf16 = autocast in main
        policy, pol_tok = world.load_policy(start_from or args.init_from or args.policy)
        world.check_vocab(pol_tok, tok)
        orm, orm_tok = world.load_oracle(getattr(args, rm), dtype)
        if args.oracle_format == "chat" and not getattr(orm_tok, "chat_template", None):
            raise world.WorldError(f"--oracle_format chat: the tokenizer of '{getattr(args, rm)}' has no chat template "
                                   f"-- use --oracle_format plain (or auto)")
    except world.WorldError as e:
        die(str(e))
    return SimpleNamespace(ref=ref.to(args.device).requires_grad_(False),
                           policy=policy.to(args.device),   # stays in eval mode: no dropout, so policy == ref gives loss log 2
                           tok=tok, eos=world.eos_ids(ref, tok), source=source,
                           oracle=Oracle(orm.to(args.device), orm_tok, fmt=args.oracle_format),   # or the judge
                           person=Person(sys.stdin, sys.stdout) if args.oracle == "human" else None,
                           train_prompts=train_prompts, test_prompts=test_prompts[:args.eval_prompts])

def fit_context(args, tok, cfg, train_prompts, test_prompts):
    """Leave out prompts too long to leave room for a full response in the policy's context."""
    n_ctx = world.context_length(cfg) or 10**9
    lens = [list(map(len, tok(ps)["input_ids"])) for ps in (train_prompts, test_prompts)]
    room = n_ctx - args.max_new_tokens
    shortest = max(min(ls) for ls in lens)      # each split needs one prompt that fits
    if shortest > room:
        raise world.WorldError(f"--max_new_tokens {args.max_new_tokens} leaves no room for the prompts in the policy's "
                               f"context ({n_ctx} tokens) -- lower --max_new_tokens to {n_ctx - shortest} or less")
    dropped = sum(n > room for ls in lens for n in ls)
    if dropped:   # long dialogues (HH-RLHF) would overflow GPT-2's positions: leave them out, and say so
        print(f"note: leaving out {dropped} prompts longer than {room} tokens (the context minus --max_new_tokens)")
    return ([p for p, n in zip(ps, ls) if n <= room] for ps, ls in zip((train_prompts, test_prompts), lens))

# -----------------------------------------------------------------------------
# a labelled pair, and moving batches of them between text, token lists and tensors

@dataclasses.dataclass
class Pair:
    """One labelled pair, as pairs.jsonl keeps it: the token ids are exact (EOS kept) so the pair can
    be trained on again (--from_pairs, --resume); `*_logp` is the log-prob of the whole response under
    the distribution it was sampled from (pi, pi+, pi-, pi_ref), for importance weights in forks.
    A pair a person skipped (--oracle human) is kept, `skipped`, so a resumed run replays it, and never trained on."""
    round: int
    step: int
    prompt: str
    chosen: str
    rejected: str
    chosen_src: str             # pi, pi+, pi-, pi_ref, best, worst
    rejected_src: str
    chosen_score: float         # the oracle's (with --oracle human: the judge's)
    rejected_score: float
    prompt_ids: list
    chosen_ids: list
    rejected_ids: list
    chosen_logp: float = None
    rejected_logp: float = None
    skipped: bool = False

def read_pairs(path, vocab_size, need=0):
    """The pairs of a pairs.jsonl, checked to fit the policy's vocabulary. Bad files exit 2."""
    fields = {f.name for f in dataclasses.fields(Pair)}
    pairs = []
    for n, line in enumerate(checkpoint.read_lines(path), 1):
        try:
            d = json.loads(line)
            p = Pair(**{k: v for k, v in d.items() if k in fields})
        except (ValueError, TypeError) as e:
            raise world.WorldError(f"{path} line {n} is not a labelled pair ({e}) -- pass the pairs.jsonl of a run")
        bad = [i for i in p.prompt_ids + p.chosen_ids + p.rejected_ids if not 0 <= i < vocab_size]
        if bad:
            raise world.WorldError(f"{path} line {n}: token id {bad[0]} is outside the policy's vocabulary ({vocab_size}) "
                                   f"-- these pairs were made with another tokenizer; pass the --policy they came from")
        pairs.append(p)
    if len(pairs) < need:
        raise world.WorldError(f"{path} holds {len(pairs)} pairs, fewer than --labels {need} -- pass --labels {len(pairs)} "
                               f"or fewer")
    return pairs

def tokenize_prompts(tok, texts, device):
    enc = tok(texts, padding=True, return_tensors="pt")  # left-padded (world.load_policy)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)

def decode(tok, ids, mask):
    return [tok.decode(i[m.bool()], skip_special_tokens=True) for i, m in zip(ids, mask)]

def unpad(ids, mask):
    """Token lists without padding, one per row: the compact form pairs are kept in."""
    return [i[m.bool()].tolist() for i, m in zip(ids, mask)]

def collate(rows, pad_id, device):
    """Pairs [(prompt, chosen, rejected) token lists] -> left-padded prompts, right-padded responses."""
    def padded(seqs, left):
        L = max(map(len, seqs))
        ids = [([pad_id] * (L - len(s)) + s) if left else (s + [pad_id] * (L - len(s))) for s in seqs]
        mask = [([0] * (L - len(s)) + [1] * len(s)) if left else ([1] * len(s) + [0] * (L - len(s))) for s in seqs]
        return torch.tensor(ids, device=device), torch.tensor(mask, device=device)
    return [t for k, left in ((0, True), (1, False), (2, False)) for t in padded([r[k] for r in rows], left)]

# -----------------------------------------------------------------------------
# the stages, in the order the data flows

def collect(run, w, args, sampler, n):
    """n labelled pairs from the frozen policy, a batch at a time, each batch on disk before any
    training on it. Pairs already in pairs.jsonl (a resumed run) are taken from there, never labelled
    again; the sampler still replays them, so every generator ends where an uninterrupted run's does."""
    pairs = []
    for i in range(0, n, args.batch_size):
        B = min(args.batch_size, n - i)
        k = max(0, min(B, len(run.disk) - run.labels))          # pairs of this batch already on disk
        if w.source is not None:                                 # --from_pairs: paid labels, in their order
            batch = [dataclasses.replace(p, round=run.round, step=run.steps) for p in w.source[run.labels:run.labels + B]]
        else:
            batch = sample_and_label(run, w, args, sampler, B)
        batch[:k] = run.disk[run.labels:run.labels + k]
        if rank == 0 and k < B and not run.human:            # (a person's answers are on disk already)
            append(run, batch[k:])
        run.labels, run.judged, run.reused = run.labels + B, run.judged + 2 * B, run.reused + k
        pairs += batch
        run.bar.update(B)
    return pairs

def append(run, pairs):
    """Pairs to pairs.jsonl in one write, flushed: labels cost money, so they reach the disk before
    any training on them."""
    run.pairs_f.write("".join(json.dumps(dataclasses.asdict(p)) + "\n" for p in pairs))
    run.pairs_f.flush()

def sample_and_label(run, w, args, sampler, B):
    """One batch: B prompts, a pair of responses for each, the oracle's label on those not yet on disk.
    Under torchrun each rank makes the pairs of its B/nproc prompts; all ranks get the whole batch."""
    texts = next_prompts(run, w.train_prompts, B)        # the same B prompts on every rank
    lo, B = rank * B // nproc, B // nproc                 # this rank's share
    texts, first = texts[lo:lo + B], run.labels + lo      # first: the global index of the share's first pair
    k = max(0, min(B, len(run.disk) - first))             # of the share, pairs already on disk
    ids_p, mask_p = tokenize_prompts(w.tok, texts, args.device)
    ts = time.time()
    with run.amp():
        out = sampler(w.policy, w.ref, ids_p, mask_p, args.beta, run.gen)
    run.sample_s += time.time() - ts
    cost = torch.tensor([out["forwards"], out["score_forwards"], int(out["a_mask"].sum() + out["b_mask"].sum())])
    if ddp:
        dist.all_reduce(cost)                              # the whole batch's sampling cost
    forwards, score_forwards, tokens = cost.tolist()
    run.forwards, run.score_forwards, run.tokens = run.forwards + forwards, run.score_forwards + score_forwards, run.tokens + tokens
    ta, tb = decode(w.tok, out["a"], out["a_mask"]), decode(w.tok, out["b"], out["b_mask"])
    pa, pb = unpad(out["a"], out["a_mask"]), unpad(out["b"], out["b_mask"])
    la, lb = ((out[f"{x}_logps"] * out[f"{x}_mask"]).sum(-1).tolist() for x in "ab")
    # Bradley-Terry uniforms for the whole batch, reused pairs included: the label stream stays the
    # uninterrupted run's, and only the pairs not on disk reach the oracle
    # (with --oracle human they set the order the two responses are shown in)
    u = torch.rand(B, generator=run.g_label) if args.label == "bt" or run.human else torch.zeros(B)
    a_wins, sa, sb = torch.zeros(B, dtype=torch.bool), torch.zeros(B), torch.zeros(B)
    if k < B and run.human:     # the judge scores what the person labels: their agreement is measured
        sa[k:], sb[k:] = w.oracle.score(texts[k:], ta[k:]), w.oracle.score(texts[k:], tb[k:])
    elif k < B:
        a_wins[k:], sa[k:], sb[k:] = w.oracle.label(texts[k:], ta[k:], tb[k:], args.label, u=u[k:])
    for j, d in enumerate(run.disk[first:first + k]):
        if d.prompt != texts[j] or sorted([d.chosen_ids, d.rejected_ids]) != sorted([pa[j], pb[j]]):
            if not run.diverged:
                print(f"note: the replayed samples differ from {args.out}/pairs.jsonl at label {first + j} "
                      f"(sampling is not bit-reproducible here); its saved labels are used as they are")
            run.diverged = True
    pp = unpad(ids_p, mask_p)
    batch = []
    for j in range(B):
        skipped = False
        if run.human and j >= k:
            ans = ask(run, w, args, texts[j], ta[j], tb[j], swap=bool(u[j] < 0.5), n=first + j + 1)
            skipped, a_wins[j] = ans is None, ans is not False
        a = (ta[j], pa[j], out["src"][j][0], sa[j].item(), la[j])
        b = (tb[j], pb[j], out["src"][j][1], sb[j].item(), lb[j])
        (c, c_ids, c_src, c_score, c_lp), (r, r_ids, r_src, r_score, r_lp) = (a, b) if a_wins[j] else (b, a)
        batch.append(Pair(round=run.round, step=run.steps, prompt=texts[j], chosen=c, rejected=r,
                          chosen_src=c_src, rejected_src=r_src, chosen_score=c_score, rejected_score=r_score,
                          prompt_ids=pp[j], chosen_ids=c_ids, rejected_ids=r_ids, chosen_logp=c_lp, rejected_logp=r_lp,
                          skipped=skipped))
        if run.human and j >= k:                            # each answer on disk at once
            append(run, batch[-1:])
    if ddp:   # every rank's share, in rank order: the batch in the order of its prompts
        shares = [None] * nproc
        dist.all_gather_object(shares, batch)
        batch = [p for share in shares for p in share]
    return batch

def ask(run, w, args, prompt, a, b, swap, n):
    """A person labels one pair, shown in the order `swap` says. -> True if a is better, False if b,
    None if skipped. On q (exit 0), or at the end of the input (exit 1), the session stops like a kill:
    every answer given is on disk, and --resume continues from the last checkpoint, reusing them."""
    ans = w.person.ask(prompt, *((b, a) if swap else (a, b)), f"pair {n} of {args.labels}")
    if ans in ("stop", "eof"):
        run.pairs_f.close()
        print(f"\nstopped{' (the input ended)' if ans == 'eof' else ''}: your answers are in {args.out}/pairs.jsonl "
              f"-- continue with python train.py --resume {args.out}")
        sys.exit(int(ans == "eof"))
    return None if ans == "skip" else (ans == 0) != swap       # the first one shown is b when swapped

def next_prompts(run, train_prompts, B):
    """The next B training prompts of a shuffled order, refilled when used up. The order is kept as
    indices (a checkpoint stores what is left of it: small even for 100k prompts)."""
    while len(run.order) < B:
        run.order += run.rng.sample(range(len(train_prompts)), len(train_prompts))
    picked, run.order = run.order[:B], run.order[B:]
    return [train_prompts[i] for i in picked]

def update(run, w, args, pairs, epochs, anchor):
    """DPO on a round's pairs: `epochs` shuffled passes of --batch_size pairs per step. `anchor` is
    the loss's reference: the initial model, or (--reference behavior) the policy that sampled them."""
    pairs = [p for p in pairs if not p.skipped]             # a person's skipped pairs have no label
    for _ in range(epochs):
        run.rng.shuffle(pairs)
        for i in range(0, len(pairs), args.batch_size):
            batch = pairs[i:i + args.batch_size]
            n = len(batch) // nproc
            batch = batch[rank * n:(rank + 1) * n]            # this rank's share (all of it in a plain run)
            prompt, prompt_m, ch, ch_m, rj, rj_m = collate([(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in batch],
                                                           w.tok.pad_token_id, args.device)
            with run.amp():     # the forward only: backward runs outside, as autocast prescribes
                pc, pr = pair_logps(run.model, prompt, prompt_m, ch, ch_m, rj, rj_m)   # run.model: DDP under torchrun
                with torch.no_grad():
                    rc, rr = pair_logps(anchor, prompt, prompt_m, ch, ch_m, rj, rj_m)
            losses, cr, rr_ = dpo_loss(pc, pr, rc, rr, args.beta, args.loss)
            loss = losses.mean()
            if args.xpo_alpha:   # XPO: push down the log-likelihood of the reference's responses
                ref_c = torch.tensor([p.chosen_src == "pi_ref" for p in batch], device=pc.device)
                ref_r = torch.tensor([p.rejected_src == "pi_ref" for p in batch], device=pc.device)
                loss = loss + args.xpo_alpha * (pc * ref_c + pr * ref_r).mean()
            run.opt.zero_grad(set_to_none=True)
            loss.backward()                 # under torchrun DDP averages the ranks' gradients here
            norm = torch.nn.utils.clip_grad_norm_(w.policy.parameters(), 1.0)
            stats = dict(loss=loss.item(), **reward_metrics(cr, rr_))
            if ddp:                         # the whole batch's means (the ranks' shares are the same size)
                t = torch.tensor(list(stats.values()), dtype=torch.float64)
                dist.all_reduce(t)
                stats = dict(zip(stats, (t / nproc).tolist()))
            # checked before the step, the same on every rank: the weights stay the last good ones
            if not math.isfinite(stats["loss"]):
                stop(run, f"the loss is {stats['loss']}")
            if not torch.isfinite(norm):
                stop(run, f"the gradient norm is {norm.item()}")
            run.opt.step()
            run.steps += 1
            run.train_log.append(stats)

def stop(run, why):
    """A non-finite loss or gradient: one line, nothing more written, the last checkpoint kept."""
    ck = checkpoint.latest(run.out)
    leave(f"train.py: stopped at step {run.steps + 1}: {why} -- nothing was written after the last good checkpoint "
          f"({ck['labels']} labels, {ck['dir']}); lower --lr, or start again with another --seed", 1)

@torch.inference_mode()
def evaluate(policy, ref, tok, oracle, prompts, args, eos_id=None):
    """Reward, KL and J of the current policy on held-out prompts (paper Sec. 6: J = reward - beta*KL),
    each with its standard error. KL is the exact per-token sum along the sampled responses
    (dpo.kl_estimates); the plain sampled log-ratio is logged beside it as kl_sampled.
    The same generator seed at every evaluation: differences between evaluations and between
    samplers come from the policy, not from the draw."""
    eos_id = tok.eos_token_id if eos_id is None else eos_id
    g = torch.Generator(args.device).manual_seed(args.seed + 12345 + rank * SEED_STRIDE)
    texts = prompts * args.eval_samples
    if ddp:
        texts = texts[rank::nproc]                        # this rank's share; the means are reduced below
    ids_p, mask_p = tokenize_prompts(tok, texts, args.device)
    # temperature 1 whatever --temperature is: reward and KL(pi || pi_ref) of the policy itself
    ids, mask, _ = generate([policy], [1.0], ids_p, mask_p, args.max_new_tokens, eos_id, tok.pad_token_id, 1.0, g)
    reward = oracle.score(texts, decode(tok, ids, mask))
    kl, kl_sampled = kl_estimates(policy, ref, ids_p, mask_p, ids, mask)
    eos = (torch.isin(ids, torch.tensor(eos_id, device=ids.device)) & mask.bool()).any(-1)
    # one value per response; J per response = reward - beta*KL, so its standard error counts their covariance
    vals = dict(reward=reward, kl=kl, kl_sampled=kl_sampled, J=reward - args.beta * kl.cpu(), len=mask.sum(-1), eos=eos)
    names, X = list(vals), torch.stack([v.double().cpu() for v in vals.values()])     # (6, N)
    t = torch.cat([X.new_tensor([X.shape[1]]), X.sum(1), (X ** 2).sum(1)])
    if ddp:   # counts, sums and sums of squares over every rank's samples
        dist.all_reduce(t)
    n, s, sq = t[0], t[1:len(names) + 1], t[len(names) + 1:]
    mean = s / n
    # standard error of each mean, the responses taken as independent draws (the prompts are fixed)
    se = ((sq - n * mean ** 2).clamp(min=0) / (n - 1) / n).sqrt() if n > 1 else torch.full_like(mean, float("nan"))
    m = dict(zip(names, mean.tolist()))
    m.update({f"{k}_se": v for k, v in zip(names, se.tolist()) if k in ("reward", "kl", "kl_sampled", "J")})
    return m

def log(run, m):
    """Counters and the training statistics since the last evaluation, appended to metrics.jsonl."""
    m.update(step=run.steps, labels=run.labels, reused=run.reused, forwards=run.forwards,
             fwd_per_pair=run.forwards / max(run.labels, 1), score_fwd_per_pair=run.score_forwards / max(run.labels, 1),
             judged_per_label=run.judged / max(run.labels, 1),
             tok_per_s=run.tokens / max(run.sample_s, 1e-9), time=time.time() - run.t0)
    if run.train_log:
        m.update({k: sum(x[k] for x in run.train_log) / len(run.train_log) for k in run.train_log[0]})
        run.train_log.clear()
    if run.human:
        m.update(agreement(run))
    run.metrics += 1
    run.last = m
    if rank:
        return
    run.metrics_f.write(json.dumps(m) + "\n")
    run.metrics_f.flush()
    tqdm.write(f"step {m['step']:4d} | labels {m['labels']:5d} | reward {m['reward']:6.3f} | KL {m['kl']:6.2f} | "
               f"J {m['J']:6.3f} | acc {m.get('acc', float('nan')):.2f} | len {m['len']:5.1f} | {m['time']:5.0f}s")
    if run.human and m["answered"]:
        tqdm.write(f"you answered {m['answered']} pairs and skipped {m['skipped']}; the judge agreed with "
                   f"{m['agree']:.0%} of your answers")

def agreement(run):
    """A person's pairs so far (--oracle human): answered, skipped, and the share of answers where the
    judge scores the chosen response above the rejected one. Read from pairs.jsonl, so a resumed
    session counts the answers of every sitting."""
    pairs = [json.loads(line) for line in checkpoint.read_lines(os.path.join(run.out, "pairs.jsonl"))[:run.labels]]
    answered = [p for p in pairs if not p.get("skipped")]
    agree = sum(p["chosen_score"] > p["rejected_score"] for p in answered) / len(answered) if answered else None
    return dict(answered=len(answered), skipped=len(pairs) - len(answered), agree=agree)   # None: nothing answered yet

COUNTERS = ["round", "labels", "judged", "reused", "steps", "forwards", "score_forwards", "tokens", "sample_s",
            "order", "train_log", "metrics", "last"]

def save(run, w):
    """A checkpoint: everything the next round depends on (checkpoint.py says how it is written)."""
    state = {k: getattr(run, k) for k in COUNTERS}
    state.update(time=time.time() - run.t0, python_rng=run.rng.getstate(), nproc=nproc)
    gens = [(run.g_sample.get_state(), run.g_label.get_state())]          # one pair per rank
    if ddp:
        gens = [None] * nproc
        dist.all_gather_object(gens, (run.g_sample.get_state(), run.g_label.get_state()))
    if rank:
        return
    rngs = dict(torch=torch.get_rng_state(), sample=[s for s, _ in gens], label=[l for _, l in gens])
    checkpoint.save(run.out, f"labels-{run.labels:07d}", w.policy, w.tok, run.opt, rngs, state)

# -----------------------------------------------------------------------------
# a run folder: started fresh, or resumed from its last checkpoint

def start(args):
    """A fresh run: the folder's earlier run files removed (--overwrite: only those), config.json written."""
    os.makedirs(args.out, exist_ok=True)
    for d in ("policy", "checkpoints"):
        shutil.rmtree(os.path.join(args.out, d), ignore_errors=True)
    for f in ("summary.json", checkpoint.POINTER, "pairs.jsonl", "metrics.jsonl"):
        if os.path.exists(os.path.join(args.out, f)):
            os.remove(os.path.join(args.out, f))
    checkpoint.write_json(os.path.join(args.out, "config.json"), vars(args))

def new_run(args, w, ck=None):
    """The run's mutable state: counters, generators, optimizer, open files; from checkpoint `ck` if given."""
    run = SimpleNamespace(out=args.out, round=0, labels=0, judged=0, reused=0, steps=0, forwards=0, score_forwards=0,
                          tokens=0, sample_s=0.0, order=[], train_log=[], metrics=0, last=None, diverged=False,
                          t0=time.time(), disk=[], human=args.oracle == "human")
    torch.manual_seed(args.seed)
    run.rng = random.Random(args.seed)                                      # prompt order, minibatch order
    run.g_sample = torch.Generator(args.device).manual_seed(args.seed + rank * SEED_STRIDE)      # responses, coin flips
    run.g_label = torch.Generator().manual_seed(args.seed + 1 + rank * SEED_STRIDE)              # Bradley-Terry labels
    run.opt = torch.optim.AdamW(w.policy.parameters(), lr=args.lr, weight_decay=0.0)
    run.model = DDP(w.policy) if ddp else w.policy       # DDP: gradients averaged over the ranks in backward()
    # bf16: forwards under autocast, one fresh context per stage. Autocast keeps its bf16 copies of the
    # weights until the outermost context exits, so one context around the whole run would make every
    # forward read the initial weights while AdamW updates the float32 ones: a run that never learns.
    run.amp = partial(torch.autocast, args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    run.gen = dict(max_new_tokens=args.max_new_tokens, eos_id=w.eos, pad_id=w.tok.pad_token_id,
                   temperature=args.temperature, generator=run.g_sample)
    pairs_path, metrics_path = os.path.join(args.out, "pairs.jsonl"), os.path.join(args.out, "metrics.jsonl")
    if ck:
        if ck.get("nproc", 1) != nproc:
            die(f"--resume {args.out}: the run was made with {ck.get('nproc', 1)} processes, this is {nproc} "
                f"-- resume it with torchrun --nproc_per_node {ck.get('nproc', 1)}" if ck.get("nproc", 1) > 1
                else f"-- resume it with plain python train.py")
        for k in COUNTERS:
            setattr(run, k, ck[k])
        run.t0 -= ck["time"]
        s = ck["python_rng"]
        run.rng.setstate((s[0], tuple(s[1]), s[2]))
        opt, rngs = checkpoint.load_tensors(ck["dir"])
        run.opt.load_state_dict(opt)
        torch.set_rng_state(rngs["torch"])
        run.g_sample.set_state(rngs["sample"][rank])
        run.g_label.set_state(rngs["label"][rank])
        # metrics after the checkpoint are made again, identically; pairs after it are reused as they are
        lines = checkpoint.read_lines(pairs_path)
        if len(lines) < ck["labels"]:
            die(f"--resume {args.out}: pairs.jsonl holds {len(lines)} pairs, fewer than its checkpoint's {ck['labels']} "
                f"-- the folder was changed by hand; start again with --overwrite")
        if rank == 0:
            checkpoint.write_lines(metrics_path, checkpoint.read_lines(metrics_path)[:ck["metrics"]])
            checkpoint.write_lines(pairs_path, lines)   # without a torn last line, if the kill left one
        try:
            run.disk = read_pairs(pairs_path, w.policy.config.vocab_size)
        except world.WorldError as e:
            die(str(e))
        if rank == 0:
                print(f"resuming {args.out} at {ck['labels']} labels; {len(lines) - ck['labels']} labels bought after that "
                  f"checkpoint are reused, not bought again")
    if rank == 0:
        run.pairs_f, run.metrics_f = open(pairs_path, "a"), open(metrics_path, "a")
    return run

def finish(run, w, args):
    """The final policy, then summary.json, whose presence marks a finished run (both atomic)."""
    if rank:
        return
    tmp = os.path.join(args.out, ".policy")
    shutil.rmtree(tmp, ignore_errors=True)
    w.policy.save_pretrained(tmp)
    w.tok.save_pretrained(tmp)
    shutil.rmtree(os.path.join(args.out, "policy"), ignore_errors=True)
    os.replace(tmp, os.path.join(args.out, "policy"))
    checkpoint.write_json(os.path.join(args.out, "summary.json"), run.last)
    run.pairs_f.close()
    run.metrics_f.close()

def crossed(labels, per_round, every):
    """Did the last round's labels pass a multiple of `every`?"""
    return labels // every > (labels - per_round) // every

def main(argv=None):
    global ddp, rank, nproc
    args = get_args(argv)
    transformers.logging.disable_progress_bar()   # our own bar is enough
    ddp = "RANK" in os.environ                    # ---- torchrun: one process per device
    if ddp:
        rank, nproc = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if args.device.startswith("cuda"):
            args.device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(args.device)
        # a rank that dies takes the others down: torchrun stops the job, and no collective waits past the timeout
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo", timeout=timedelta(minutes=10))
        if rank:
            dist.barrier()                        # rank 0 builds the world (once) before the others read it
    ck = checkpoint.latest(args.out) if args.resume else None
    w = load(args, start_from=ck and os.path.join(ck["dir"], "policy"))
    if ddp and rank == 0:
        dist.barrier()
    if not args.resume and rank == 0:
        start(args)
    run = new_run(args, w, ck)
    online = args.mode == "online"
    rounds = args.labels // args.batch_size if online else args.iterations
    per_round = args.batch_size if online else args.labels // args.iterations
    run.bar = tqdm(total=args.labels, initial=run.labels, desc=f"{args.sampler}/{args.mode}", unit="label",
                   disable=rank > 0 or run.human)           # a person reads the pairs in this terminal
    if not args.resume:
        with run.amp():
            log(run, evaluate(w.policy, w.ref, w.tok, w.oracle, w.test_prompts, args, w.eos))
        save(run, w)
    for r in range(run.round, rounds):
        # the paper's iterative protocol: the first round is Vanilla for every sampler
        name = "vanilla" if (not online and r == 0) else args.sampler
        sampler = partial(SAMPLERS[name], n=args.n) if name == "best_of_n" else SAMPLERS[name]
        # BPO (arXiv 2406.12168): the loss anchors to the behaviour policy, the frozen copy that sampled
        # this round (online: the policy before the step). PILAF's pi+- still tilt against the initial
        # model: against the behaviour policy itself they would equal pi.
        anchor = copy.deepcopy(w.policy).requires_grad_(False) if args.reference == "behavior" else w.ref
        pairs = collect(run, w, args, sampler, per_round)
        update(run, w, args, pairs, 1 if online else args.epochs, anchor)
        run.round = r + 1
        if crossed(run.labels, per_round, args.eval_every) or r == rounds - 1:
            with run.amp():
                log(run, evaluate(w.policy, w.ref, w.tok, w.oracle, w.test_prompts, args, w.eos))
        if crossed(run.labels, per_round, args.save_every) or r == rounds - 1:
            save(run, w)
    run.bar.close()
    finish(run, w, args)
    if ddp:   # DDP's reducer goes first, while the group lives (freed at exit it can deadlock gloo's
        run.model = None   # teardown), then every rank leaves together
        dist.barrier()
        dist.destroy_process_group()
    return run.last

if __name__ == "__main__":
    main()
