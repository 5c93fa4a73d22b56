"""
Online and iterative DPO with a choice of pair sampler: the algorithm, top to bottom.

    for each round:
        collect    draw prompts -> the sampler makes a pair of responses to each with the current
                   (frozen) policy -> the labeller says which is better -> each pair on disk
        update     DPO steps on those pairs, the reference fixed to the initial model (--reference
                   behavior: to the frozen policy that sampled them, as in BPO)
        evaluate   every --eval_every labels: reward, KL and J on held-out prompts
        save       every --save_every labels: a checkpoint, so --resume can continue

online DPO:    one round per step: --batch_size fresh pairs, one gradient step on them
iterative DPO: --iterations rounds of --labels/--iterations pairs, --epochs passes over each;
               the first round is Vanilla for every sampler (paper Sec. 6.1)

The machinery around it, which a reader of the algorithm may skip, reaches it as one call each, and
each does nothing special in a plain run: options.py (the command line and its checks), load.py
(models, oracle, labeller and prompts by name), folder.py (the run folder: one writer, every stop in
one line), pairs.Ledger (each labelled pair on disk as it is given; on a resume, the pairs bought
after the checkpoint answer first), metrics.py (the metrics log), checkpoint.py, ddp.py (torchrun).

    python train.py --sampler pilaf                       # the embedded world: under a minute on 2 CPU cores
    python train.py --resume out/pilaf-online-s0          # continue a killed run; its labels are reused
    python train.py --from_pairs out/pilaf-online-s0/pairs.jsonl --beta 0.2 --out out/beta0.2   # paid labels, new beta
    python train.py --policy gpt2 --oracle <rm folder> --prompts imdb --prompt_format imdb --prompt_column text
    torchrun --standalone --nproc_per_node 2 train.py --sampler pilaf --out out/ddp   # the same loop on 2 processes
"""
import omp  # noqa: F401  (first: how the CPU threads wait, set before torch loads; omp.py says why)

import copy
import dataclasses
import random
import time
from functools import partial

import torch

import checkpoint
import ddp
import folder
import options
import pilaf
from dpo import dpo_loss, kl_estimates, pair_logps, reward_metrics
from load import load
from metrics import Log
from pairs import Ledger, collate, decode, labelled, responses, tokenize, unpad
from sample import generate

@dataclasses.dataclass
class Run:
    """Where a run stands: the counters a checkpoint keeps and metrics.jsonl reports. What the run
    optimises and draws with are attributes start() adds."""
    round: int = 0              # rounds finished
    labels: int = 0             # labels used so far: the annotation budget
    judged: int = 0             # responses shown to the labeller (two per label; paper Table 1)
    reused: int = 0             # labels a resumed run took from pairs.jsonl instead of buying them again
    steps: int = 0              # DPO steps
    forwards: int = 0           # sampling forwards (paper Table 1)
    score_forwards: int = 0     # extra teacher-forced passes (best_of_n's ranking)
    tokens: int = 0             # tokens of the labelled responses
    sample_s: float = 0.0       # seconds spent sampling
    order: list = dataclasses.field(default_factory=list)       # the shuffled prompt indices still to come
    train_log: list = dataclasses.field(default_factory=list)   # each step's statistics since the last evaluation
    tally: dict = dataclasses.field(default_factory=lambda: dict(answered=0, skipped=0, agreed=0))  # of the pairs so far
    metrics: int = 0            # lines of metrics.jsonl
    last: dict = None           # the last evaluation

def start(args, policy):
    """A run at its start: the counters, and what it optimises and draws with (a resumed run then sets
    them as its checkpoint left them: checkpoint.restore)."""
    run = Run()
    run.out, run.t0, run.keep_checkpoints = args.out, time.time(), args.keep_checkpoints
    torch.manual_seed(args.seed)
    run.rng = random.Random(args.seed)                                              # prompt order, minibatch order
    run.g_sample = torch.Generator(args.device).manual_seed(ddp.seed(args.seed))    # responses, PILAF's coins
    run.g_label = torch.Generator().manual_seed(ddp.seed(args.seed + 1))            # Bradley-Terry labels
    run.opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=0.0)
    run.model = ddp.wrap(policy)       # DDP under torchrun: gradients averaged over the ranks in backward()
    # bf16: forwards under autocast, one fresh context per stage. Autocast keeps its bf16 copies of the
    # weights until the outermost context exits, so one context around the whole run would make every
    # forward read the initial weights while AdamW updates the float32 ones: a run that never learns.
    # (--fsdp casts for the forward itself: ddp.shard's MixedPrecisionPolicy)
    run.amp = partial(torch.autocast, args.device.split(":")[0], dtype=torch.bfloat16,
                      enabled=args.dtype == "bfloat16" and not ddp.fsdp)
    return run

def collect(run, w, args, sampler, n):
    """n labelled pairs from the frozen policy, a batch at a time: prompts -> sampler -> labeller -> pairs,
    each pair on disk as it is labelled, before any training on it: labels cost money."""
    pairs = []
    gen = dict(max_new_tokens=args.max_new_tokens, eos_id=w.eos, pad_id=w.tok.pad_token_id,
               temperature=args.temperature, generator=run.g_sample)
    for i in range(0, n, args.batch_size):
        B = min(args.batch_size, n - i)
        texts = ddp.share(next_prompts(run, w.train_prompts, B))      # this rank's prompts: all B in one process
        ids_p, mask_p = tokenize(w.tok, texts, args.device)
        t = time.time()
        with run.amp():
            out = sampler(w.policy, w.ref, ids_p, mask_p, args.beta, gen)
        spent(run, out, time.time() - t)
        a, b = responses(w.tok, out, "a", w.eos), responses(w.tok, out, "b", w.eos)
        # one uniform per pair: its Bradley-Terry draw (a person: the order the two are shown in)
        u = torch.rand(len(texts), generator=run.g_label)
        labels = w.labeller.label(texts, a, b, u, run.labels + ddp.offset(B))   # a Label per pair, as each is given
        prompt_ids, extra = unpad(ids_p, mask_p), out.get("extra") or [None] * len(texts)
        new = (labelled(run.round, run.steps, texts[j], prompt_ids[j], a[j], b[j], lab, extra[j])
               for j, lab in enumerate(labels))
        pairs += run.ledger.keep(run, new)          # each on disk as it is labelled; all ranks' pairs, counted
    return pairs

def next_prompts(run, train_prompts, B):
    """The next B training prompts of a shuffled order, refilled when used up. The order is kept as
    indices (a checkpoint stores what is left of it: small even for 100k prompts)."""
    while len(run.order) < B:
        run.order += run.rng.sample(range(len(train_prompts)), len(train_prompts))
    picked, run.order = run.order[:B], run.order[B:]
    return [train_prompts[i] for i in picked]

def spent(run, out, seconds):
    """A batch's sampling cost (paper Table 1): forwards, extra scoring passes and response tokens,
    summed over the ranks; and this rank's seconds."""
    cost = ddp.total([out.get("forwards", 0), out.get("score_forwards", 0), int(out["a_mask"].sum() + out["b_mask"].sum())])
    run.forwards, run.score_forwards, run.tokens = (x + int(c) for x, c in zip((run.forwards, run.score_forwards, run.tokens), cost))
    run.sample_s += seconds

def update(run, w, args, pairs, epochs, anchor):
    """DPO on a round's pairs: `epochs` shuffled passes of --batch_size pairs per step. `anchor` is
    the loss's reference: the initial model, or (--reference behavior) the policy that sampled them."""
    pairs = [p for p in pairs if not p.skipped]             # a person's skipped pairs have no label
    for _ in range(epochs):
        run.rng.shuffle(pairs)
        for i in range(0, len(pairs), args.batch_size):
            batch = ddp.share(pairs[i:i + args.batch_size])   # this rank's share (all of it in a plain run)
            tensors = collate(batch, w.tok.pad_token_id, args.device)   # prompt, chosen, rejected: ids and masks
            with run.amp():     # the forward only: backward runs outside, as autocast prescribes
                pc, pr = pair_logps(run.model, *tensors)      # the policy's (through DDP under torchrun)
                with torch.no_grad():
                    rc, rr = pair_logps(anchor, *tensors)
            losses, cr, rr_ = dpo_loss(pc, pr, rc, rr, args.beta, args.loss)
            # a pair's loss weight, where its sampler gave one (t_pilaf --prompt_weight), else 1
            weight = torch.tensor([(p.extra or {}).get("weight", 1.0) for p in batch], device=losses.device)
            loss = (weight * losses).mean()
            if args.xpo_alpha:   # XPO: push down the log-likelihood of the reference's responses
                ref_c = torch.tensor([p.chosen_src == "pi_ref" for p in batch], device=pc.device)
                ref_r = torch.tensor([p.rejected_src == "pi_ref" for p in batch], device=pc.device)
                loss = loss + args.xpo_alpha * (pc * ref_c + pr * ref_r).mean()
            run.opt.zero_grad(set_to_none=True)
            loss.backward()                 # under torchrun DDP averages the ranks' gradients here
            norm = ddp.full(torch.nn.utils.clip_grad_norm_(w.policy.parameters(), 1.0))   # (--fsdp: of every rank's shards)
            stats = ddp.mean(dict(loss=loss.item(), **reward_metrics(cr, rr_), grad_norm=norm.item()))   # the whole batch's
            checkpoint.finite_or_stop(run, stats["loss"], norm)   # before the step: the weights stay the last good ones
            run.opt.step()
            run.steps += 1
            run.train_log.append(stats)

@torch.no_grad()
def evaluate(policy, ref, tok, scorer, prompts, beta, samples, max_new_tokens, seed=0, eos_id=None):
    """Reward, KL and J of the current policy on held-out prompts (paper Sec. 6: J = reward - beta*KL),
    each with its standard error: `samples` responses per prompt, scored by `scorer`. KL is the exact
    per-token sum along the sampled responses (dpo.kl_estimates); the plain sampled log-ratio is
    logged beside it as kl_sampled. The same generator seed at every evaluation: differences between
    evaluations and between samplers come from the policy, not from the draw."""
    eos_id = tok.eos_token_id if eos_id is None else eos_id
    g = torch.Generator(policy.device).manual_seed(ddp.seed(seed + 12345))
    texts = ddp.deal(prompts * samples)               # this rank's share; the sums are reduced below
    ids_p, mask_p = tokenize(tok, texts, policy.device)
    # temperature 1 whatever --temperature is: reward and KL(pi || pi_ref) of the policy itself
    ids, mask, _ = generate([policy], [1.0], ids_p, mask_p, max_new_tokens, eos_id, tok.pad_token_id, 1.0, g)
    reward = scorer.score(texts, decode(tok, ids, mask))
    kl, kl_sampled = kl_estimates(policy, ref, ids_p, mask_p, ids, mask)
    eos = (torch.isin(ids, torch.tensor(eos_id, device=ids.device)) & mask.bool()).any(-1)
    # one value per response; J per response = reward - beta*KL, so its standard error counts their covariance;
    # abs_r = |r_theta| = beta*|log pi/pi_ref| of the response: how far the tilt e^{+-r_theta} of PILAF's pi+- reaches
    vals = dict(reward=reward, kl=kl, kl_sampled=kl_sampled, J=reward - beta * kl.cpu(), len=mask.sum(-1), eos=eos,
                abs_r=beta * kl_sampled.abs())
    names, X = list(vals), torch.stack([v.double().cpu() for v in vals.values()])     # (7, N)
    t = ddp.total(torch.cat([X.new_tensor([X.shape[1]]), X.sum(1), (X ** 2).sum(1)]))   # counts, sums, sums of squares
    n, s, sq = t[0], t[1:len(names) + 1], t[len(names) + 1:]
    mean = s / n
    # standard error of each mean, the responses taken as independent draws (the prompts are fixed)
    se = ((sq - n * mean ** 2).clamp(min=0) / (n - 1) / n).sqrt() if n > 1 else torch.full_like(mean, float("nan"))
    m = dict(zip(names, mean.tolist()))
    m.update({f"{k}_se": v for k, v in zip(names, se.tolist()) if k in ("reward", "kl", "kl_sampled", "J")})
    return m

def crossed(labels, per_round, every):
    """Did the last round's labels pass a multiple of `every`?"""
    return labels // every > (labels - per_round) // every

def main(argv=None):
    args = options.get_args(argv)
    args.device = ddp.init(args.device, args.fsdp)         # torchrun: one process per device
    with folder.claim(args):    # this process alone writes the folder; any stop (Ctrl-C, q...) ends like a kill
        ck = checkpoint.latest(args.out) if args.resume else None
        w = ddp.first(lambda: load(args, start_from=ck and ck["policy"]))   # (rank 0 first: it may build the world)
        run = start(args, w.policy)
        if ck:
            checkpoint.restore(run, ck, w)                   # the counters, generators and optimizer it saved
        else:
            folder.fresh(args)                               # config.json (an earlier run moved aside: --overwrite)
        run.ledger = Ledger(args, w, run, ck)              # pairs.jsonl: each pair on disk as it is labelled
        w.labeller = run.ledger.replay(w.labeller)         # resumed: the pairs bought after the checkpoint answer first
        log = Log(args.out, w.labeller.report, keep=ck["metrics"] if ck else 0)   # metrics.jsonl
        online = args.mode == "online"
        rounds = args.labels // args.batch_size if online else args.iterations
        per_round = args.batch_size if online else args.labels // args.iterations

        def evaluate_and_log():
            with run.amp():
                log(run, evaluate(w.policy, w.ref, w.tok, w.oracle, w.test_prompts, args.beta, args.eval_samples,
                                  args.max_new_tokens, args.seed, w.eos))
        if not args.resume:
            evaluate_and_log()
            checkpoint.save(run, w)
        for r in range(run.round, rounds):
            # the paper's iterative protocol: the first round is Vanilla for every sampler
            name = "vanilla" if (not online and r == 0) else args.sampler
            sampler = partial(pilaf.SAMPLERS[name], **{k: getattr(args, k) for k in pilaf.options(name)})
            # BPO (arXiv 2406.12168): the loss anchors to the behaviour policy, the frozen copy that sampled
            # this round (online: the policy before the step). PILAF's pi+- still tilt against the initial
            # model: against the behaviour policy itself they would equal pi.
            anchor = copy.deepcopy(w.policy).requires_grad_(False) if args.reference == "behavior" else w.ref
            if w.source is None:
                pairs = collect(run, w, args, sampler, per_round)
            else:                                            # --from_pairs: labels already paid for, in their order
                pairs = run.ledger.reread(run, w.source, per_round, args.batch_size)
            update(run, w, args, pairs, 1 if online else args.epochs, anchor)
            run.round = r + 1
            if crossed(run.labels, per_round, args.eval_every) or r == rounds - 1:
                evaluate_and_log()
            if crossed(run.labels, per_round, args.save_every) or r == rounds - 1:
                checkpoint.save(run, w)
        run.ledger.close()
        checkpoint.finish(run, w)
    ddp.close(run)
    return run.last

if __name__ == "__main__":
    main()
