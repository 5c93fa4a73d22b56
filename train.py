"""
Online and iterative DPO with a choice of pair sampler. The loop below is the whole algorithm:

    for each round:
        draw prompts -> the sampler makes pairs of responses with the current (frozen) policy
        the oracle labels each pair (chosen / rejected)        -> appended to <out>/pairs.jsonl
        DPO updates of the policy on those pairs, reference fixed to the initial model
        every --eval_every labels: reward, KL, J on held-out prompts -> <out>/metrics.jsonl

online DPO:    one round per step: --batch_size fresh pairs, one gradient step on them
iterative DPO: --iterations rounds of --labels/--iterations pairs, --epochs passes over each;
               the first round is Vanilla for every sampler (paper Sec. 6.1)

    python train.py --sampler pilaf                       # the embedded world, a few minutes on a CPU
    python train.py --sampler vanilla --mode iterative
    python train.py --policy gpt2 --oracle <rm folder> --prompts imdb --prompt_format imdb --prompt_column text
"""
import argparse
import json
import os
import random
import shutil
import sys
import time
from functools import partial

import torch
import transformers
from tqdm import tqdm

import world
from dpo import dpo_loss, log_ratio, pair_logps, reward_metrics
from oracle import Oracle
from pilaf import SAMPLERS
from sample import generate

def die(msg):
    """Bad input: one line naming the fix, exit code 2 (like argparse), nothing else."""
    print(f"train.py: error: {msg}", file=sys.stderr)
    sys.exit(2)

def get_args(argv=None):
    p = argparse.ArgumentParser(description="Online / iterative DPO with PILAF and baseline pair samplers.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = die   # one line instead of usage + error
    g = p.add_argument_group("algorithm")
    g.add_argument("--sampler", default="pilaf", choices=list(SAMPLERS), help="how pairs are drawn (pilaf.py)")
    g.add_argument("--mode", default="online", choices=["online", "iterative"], help="fresh pairs every step, or K collect-then-train rounds")
    g.add_argument("--beta", type=float, default=0.1, help="DPO beta; also PILAF's interpolation weight and the KL weight in J")
    g.add_argument("--n", type=int, default=8, help="best_of_n: candidates per prompt")
    g.add_argument("--xpo_alpha", type=float, default=0.0, help="hybrid: XPO exploration term alpha*log pi(y_ref) added to the loss (0 = plain DPO)")
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
    g.add_argument("--oracle", default=None, help="reward model (sequence classifier) name or folder")
    g.add_argument("--prompts", default=None, help="prompt data set: name or a saved DatasetDict folder")
    g.add_argument("--prompt_column", default="prompt", help="column holding the prompt text")
    g.add_argument("--prompt_format", default="raw", choices=list(world.FORMATS), help="hh: cut HH-RLHF dialogues at the last assistant turn; imdb: first words of a review")
    g.add_argument("--train_split", default="train", help="split the training prompts come from")
    g.add_argument("--test_split", default="test", help="held-out split for evaluation")
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--eval_every", type=int, default=512, help="evaluate after every this many labels (and at start and end)")
    g.add_argument("--eval_prompts", type=int, default=64, help="held-out prompts per evaluation (at most the split's size)")
    g.add_argument("--eval_samples", type=int, default=8, help="policy samples per held-out prompt")
    g.add_argument("--out", default=None, help="run folder (default out/<sampler>-<mode>-s<seed>)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    g.add_argument("--seed", type=int, default=0, help="seeds prompts, sampling, labels and init")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model weights")
    args = p.parse_args(argv)

    # bad input fails here, before anything is built, loaded or written
    for name in ["labels", "batch_size", "iterations", "epochs", "max_new_tokens", "n", "eval_every", "eval_prompts", "eval_samples"]:
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
    args.out = args.out or os.path.join("out", f"{args.sampler}-{args.mode}-s{args.seed}")
    if os.path.exists(os.path.join(args.out, "pairs.jsonl")) and not args.overwrite:
        die(f"{args.out} already holds a run (its labels would be lost) -- pass another --out, or --overwrite")
    return args

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

@torch.no_grad()
def evaluate(policy, ref, tok, oracle, prompts, args):
    """Reward, KL and J of the current policy on held-out prompts (paper Sec. 6: J = reward - beta*KL).
    The same generator seed at every evaluation: differences between evaluations and between
    samplers come from the policy, not from the draw."""
    g = torch.Generator(args.device).manual_seed(args.seed + 12345)
    texts = prompts * args.eval_samples
    ids_p, mask_p = tokenize_prompts(tok, texts, args.device)
    # temperature 1 whatever --temperature is: reward and KL(pi || pi_ref) of the policy itself
    ids, mask, _ = generate([policy], [1.0], ids_p, mask_p, args.max_new_tokens, tok.eos_token_id, tok.pad_token_id, 1.0, g)
    reward = oracle.score(texts, decode(tok, ids, mask))
    kl = log_ratio(policy, ref, ids_p, mask_p, ids, mask).float().cpu()
    eos = ((ids == tok.eos_token_id) & mask.bool()).any(-1).float()
    m = dict(reward=reward.mean().item(), kl=kl.mean().item(), len=mask.sum(-1).float().mean().item(), eos=eos.mean().item())
    m["J"] = m["reward"] - args.beta * m["kl"]
    return m

def main(argv=None):
    args = get_args(argv)
    transformers.logging.disable_progress_bar()   # our own bar is enough
    t0 = time.time()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)                                      # prompt order, minibatch order
    g_sample = torch.Generator(args.device).manual_seed(args.seed)      # responses, coin flips
    g_label = torch.Generator().manual_seed(args.seed + 1)              # Bradley-Terry labels

    # ---- the world: reference policy, oracle, prompts (names are checked before any weights load)
    try:
        if None in (args.policy, args.oracle, args.prompts):
            wdir = world.ensure(args.world)
            args.policy = args.policy or os.path.join(wdir, "policy")
            args.oracle = args.oracle or os.path.join(wdir, "oracle")
            args.prompts = args.prompts or os.path.join(wdir, "prompts")
        cfg = world.check_name("policy", args.policy)
        world.check_name("oracle", args.oracle)
        if args.init_from:
            world.check_name("--init_from checkpoint", args.init_from)
        train_prompts, test_prompts = world.load_prompts(args.prompts, args.prompt_column, args.prompt_format,
                                                         args.train_split, args.test_split)
        tok = world.load_policy_tokenizer(args.policy)
        n_ctx = world.context_length(cfg) or 10**9
        lens = [list(map(len, tok(ps)["input_ids"])) for ps in (train_prompts, test_prompts)]
        room = n_ctx - args.max_new_tokens          # longest prompt that leaves room for a full response
        shortest = max(min(ls) for ls in lens)      # each split needs one prompt that fits
        if shortest > room:
            raise world.WorldError(f"--max_new_tokens {args.max_new_tokens} leaves no room for the prompts in the policy's "
                                   f"context ({n_ctx} tokens) -- lower --max_new_tokens to {n_ctx - shortest} or less")
        dropped = sum(n > room for ls in lens for n in ls)
        if dropped:   # long dialogues (HH-RLHF) would overflow GPT-2's positions: leave them out, and say so
            print(f"note: leaving out {dropped} prompts longer than {room} tokens (the context minus --max_new_tokens)")
            train_prompts, test_prompts = ([p for p, n in zip(ps, ls) if n <= room]
                                           for ps, ls in zip((train_prompts, test_prompts), lens))
        dtype = getattr(torch, args.dtype)
        ref, _ = world.load_policy(args.policy, dtype)
        # the trained weights stay float32 (bf16 would round most AdamW steps away); bf16 = autocast below
        policy, pol_tok = world.load_policy(args.init_from or args.policy)
        world.check_vocab(pol_tok, tok)
        orm, orm_tok = world.load_oracle(args.oracle, dtype)
    except world.WorldError as e:
        die(str(e))
    ref.to(args.device).requires_grad_(False)
    policy.to(args.device)   # stays in eval mode: no dropout, so policy == reference gives loss log 2
    oracle = Oracle(orm.to(args.device), orm_tok)
    test_prompts = test_prompts[:args.eval_prompts]

    # ---- the run folder: config first, then pairs and metrics as they come (--overwrite replaces
    # only a run's own files, never anything else in the folder)
    os.makedirs(args.out, exist_ok=True)
    shutil.rmtree(os.path.join(args.out, "policy"), ignore_errors=True)
    if os.path.exists(os.path.join(args.out, "summary.json")):
        os.remove(os.path.join(args.out, "summary.json"))
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(vars(args), f, indent=1)
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=0.0)
    gen = dict(max_new_tokens=args.max_new_tokens, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
               temperature=args.temperature, generator=g_sample)
    online = args.mode == "online"
    rounds = args.labels // args.batch_size if online else args.iterations
    per_round = args.batch_size if online else args.labels // args.iterations
    epochs = 1 if online else args.epochs
    stats = dict(steps=0, forwards=0, score_forwards=0, tokens=0, sample_s=0.0)
    train_log = []          # (loss, acc, margin) of each DPO step since the last evaluation
    order = []              # shuffled training prompts, refilled when used up

    # bf16: forwards under autocast, one fresh context per stage. Autocast keeps its bf16 copies of the
    # weights until the outermost context exits, so one context around the whole run would make every
    # forward read the initial weights while AdamW updates the float32 ones: a run that never learns.
    amp = partial(torch.autocast, args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    with open(os.path.join(args.out, "pairs.jsonl"), "w") as pairs_f, \
         open(os.path.join(args.out, "metrics.jsonl"), "w") as metrics_f:
        def log(m):
            m.update(step=stats["steps"], labels=oracle.labels, forwards=stats["forwards"],
                     fwd_per_pair=stats["forwards"] / max(oracle.labels, 1),
                     score_fwd_per_pair=stats["score_forwards"] / max(oracle.labels, 1),
                     judged_per_label=oracle.judged / max(oracle.labels, 1),
                     tok_per_s=stats["tokens"] / max(stats["sample_s"], 1e-9), time=time.time() - t0)
            if train_log:
                m.update({k: sum(x[k] for x in train_log) / len(train_log) for k in train_log[0]})
                train_log.clear()
            metrics_f.write(json.dumps(m) + "\n")
            metrics_f.flush()
            tqdm.write(f"step {m['step']:4d} | labels {m['labels']:5d} | reward {m['reward']:6.3f} | KL {m['kl']:6.2f} | "
                       f"J {m['J']:6.3f} | acc {m.get('acc', float('nan')):.2f} | len {m['len']:5.1f} | {m['time']:5.0f}s")
            return m

        with amp():
            last = log(evaluate(policy, ref, tok, oracle, test_prompts, args))
        bar = tqdm(total=args.labels, desc=f"{args.sampler}/{args.mode}", unit="label")
        for r in range(rounds):
            # the paper's iterative protocol: the first round is Vanilla for every sampler
            name = "vanilla" if (not online and r == 0) else args.sampler
            sampler = partial(SAMPLERS[name], n=args.n) if name == "best_of_n" else SAMPLERS[name]
            # ---- collect and label per_round pairs with the policy frozen
            rows = []
            for i in range(0, per_round, args.batch_size):
                B = min(args.batch_size, per_round - i)
                while len(order) < B:
                    order += rng.sample(train_prompts, len(train_prompts))
                texts, order = order[:B], order[B:]
                ids_p, mask_p = tokenize_prompts(tok, texts, args.device)
                ts = time.time()
                with amp():
                    out = sampler(policy, ref, ids_p, mask_p, args.beta, gen)
                stats["sample_s"] += time.time() - ts
                stats["forwards"] += out["forwards"]
                stats["score_forwards"] += out["score_forwards"]
                stats["tokens"] += int(out["a_mask"].sum() + out["b_mask"].sum())
                ta, tb = decode(tok, out["a"], out["a_mask"]), decode(tok, out["b"], out["b_mask"])
                a_wins, sa, sb = oracle.label(texts, ta, tb, args.label, g_label)
                pa, pb = unpad(out["a"], out["a_mask"]), unpad(out["b"], out["b_mask"])
                for j, (prompt, w) in enumerate(zip(texts, a_wins.tolist())):
                    c, rj = (0, 1) if w else (1, 0)     # index into (a, b): chosen, rejected
                    row = (unpad(ids_p[j:j + 1], mask_p[j:j + 1])[0], (pa[j], pb[j])[c], (pa[j], pb[j])[rj],
                           out["src"][j][c], out["src"][j][rj])
                    pair = dict(round=r, step=stats["steps"], prompt=prompt, chosen=(ta[j], tb[j])[c], rejected=(ta[j], tb[j])[rj],
                                chosen_src=row[3], rejected_src=row[4],
                                chosen_score=(sa[j], sb[j])[c].item(), rejected_score=(sa[j], sb[j])[rj].item(),
                                prompt_ids=row[0], chosen_ids=row[1], rejected_ids=row[2])   # ids: exact reuse, EOS kept
                    pairs_f.write(json.dumps(pair) + "\n")
                    rows.append(row)
                pairs_f.flush()    # labels cost money: on disk before any training on them
                bar.update(B)
            # ---- DPO on this round's pairs
            for _ in range(epochs):
                rng.shuffle(rows)
                for i in range(0, len(rows), args.batch_size):
                    batch = rows[i:i + args.batch_size]
                    prompt, prompt_m, ch, ch_m, rj, rj_m = collate([x[:3] for x in batch], tok.pad_token_id, args.device)
                    with amp():     # the forward only: backward runs outside, as autocast prescribes
                        pc, pr = pair_logps(policy, prompt, prompt_m, ch, ch_m, rj, rj_m)
                        with torch.no_grad():
                            rc, rr = pair_logps(ref, prompt, prompt_m, ch, ch_m, rj, rj_m)
                    losses, cr, rr_ = dpo_loss(pc, pr, rc, rr, args.beta)
                    loss = losses.mean()
                    if args.xpo_alpha:   # XPO: push down the log-likelihood of the reference's responses
                        ref_c = torch.tensor([x[3] == "pi_ref" for x in batch], device=pc.device)
                        ref_r = torch.tensor([x[4] == "pi_ref" for x in batch], device=pc.device)
                        loss = loss + args.xpo_alpha * (pc * ref_c + pr * ref_r).mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
                    opt.step()
                    stats["steps"] += 1
                    train_log.append(dict(loss=loss.item(), **reward_metrics(cr, rr_)))
            if oracle.labels // args.eval_every > (oracle.labels - per_round) // args.eval_every or r == rounds - 1:
                with amp():
                    last = log(evaluate(policy, ref, tok, oracle, test_prompts, args))
        bar.close()
    policy.save_pretrained(os.path.join(args.out, "policy"))
    tok.save_pretrained(os.path.join(args.out, "policy"))
    with open(os.path.join(args.out, "summary.json"), "w") as f:   # written last: marks the run finished
        json.dump(last, f, indent=1)
    return last

if __name__ == "__main__":
    main()
