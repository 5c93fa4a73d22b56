"""
A labelled pair: the record pairs.jsonl keeps (one JSON line per pair), the ledger that writes it
(every pair on disk as it is labelled, before any training on it: labels cost money), reading such a
file back (--resume, --from_pairs), and the padded tensors the DPO step reads.
"""
import dataclasses
import json
import os

import torch
from tqdm import tqdm

import ddp
from errors import UserError
from folder import read_lines, still_ours, write_text
from oracle import Label, Labeller

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
    extra: dict = None          # what the sampler adds about the pair (t_pilaf: Z+, Z-, branch); left out when None

def labelled(round, step, prompt, prompt_ids, a, b, label, extra=None):
    """The Pair of one prompt's two responses a and b (Response records) under the labeller's `label`."""
    (c, c_score), (r, r_score) = ((a, label.score_a), (b, label.score_b)) if label.a_wins else ((b, label.score_b), (a, label.score_a))
    return Pair(round=round, step=step, prompt=prompt, chosen=c.text, rejected=r.text, chosen_src=c.src,
                rejected_src=r.src, chosen_score=c_score, rejected_score=r_score, prompt_ids=prompt_ids,
                chosen_ids=c.ids, rejected_ids=r.ids, chosen_logp=c.logp, rejected_logp=r.logp, skipped=label.skipped,
                extra=extra)

@dataclasses.dataclass
class Response:
    """One sampled response, as a labeller reads it and a pair record keeps it."""
    text: str
    ids: list                   # its token ids, the ending one included
    src: str                    # the distribution it was drawn from: pi, pi+, pi-, pi_ref, best, worst
    logp: float                 # its log-prob under that distribution
    cut: bool                   # it ran out of tokens (--max_new_tokens) before an end-of-response id

def responses(tok, out, side, eos):
    """The sampler's `side` ("a" or "b") responses of a batch as Response records; `eos`: the ids
    that end a response."""
    ids, mask = out[side], out[f"{side}_mask"]
    logp = (out[f"{side}_logps"] * mask).sum(-1).tolist()
    return [Response(t, i, s[side == "b"], lp, not i or i[-1] not in eos) for t, i, s, lp in
            zip(decode(tok, ids, mask), unpad(ids, mask), out["src"], logp)]

def line(p):
    d = dataclasses.asdict(p)
    if d["extra"] is None:
        del d["extra"]
    return json.dumps(d) + "\n"

def read(path, vocab_size, need=0):
    """The pairs of a pairs.jsonl, each checked (parse), at least `need` of them."""
    got = [parse(line, n, path, vocab_size) for n, line in enumerate(read_lines(path), 1)]
    if len(got) < need:
        raise UserError(f"{path} holds {len(got)} pairs, fewer than --labels {need} -- pass --labels {len(got)} or fewer")
    return got

def parse(line, n, path, vocab_size):
    """One line of a pairs.jsonl as a Pair, checked: the fields a Pair has, integer token ids that fit
    the policy's vocabulary. Bad lines raise UserError (one line, exit 2)."""
    fields = {f.name for f in dataclasses.fields(Pair)}
    try:
        p = Pair(**{k: v for k, v in json.loads(line).items() if k in fields})
    except (ValueError, TypeError) as e:
        raise UserError(f"{path} line {n} is not a labelled pair ({e}) -- pass the pairs.jsonl of a run") from None
    for ids in (p.prompt_ids, p.chosen_ids, p.rejected_ids):
        if not isinstance(ids, list) or not all(type(i) is int for i in ids):
            raise UserError(f"{path} line {n}: token ids must be a list of integers (got {ids!r:.40}) "
                            f"-- the file was changed by hand; pass the pairs.jsonl of a run")
    bad = [i for i in p.prompt_ids + p.chosen_ids + p.rejected_ids if not 0 <= i < vocab_size]
    if bad:
        raise UserError(f"{path} line {n}: token id {bad[0]} is outside the policy's vocabulary ({vocab_size}) "
                        f"-- these pairs were made with another tokenizer; pass the --policy they came from")
    return p

def tokenize(tok, texts, device):
    """A batch of prompts, left-padded (world.load_policy sets the side). -> ids, mask (B, P)"""
    enc = tok(texts, padding=True, return_tensors="pt")
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)

def decode(tok, ids, mask):
    return [tok.decode(i[m.bool()], skip_special_tokens=True) for i, m in zip(ids, mask)]

def unpad(ids, mask):
    """Token lists without padding, one per row: the compact form pairs are kept in."""
    return [i[m.bool()].tolist() for i, m in zip(ids, mask)]

def collate(pairs, pad_id, device):
    """Pairs -> left-padded prompts, right-padded chosen and rejected responses: six (B, L) tensors,
    (ids, mask) of each, in the argument order of dpo.pair_logps."""
    def padded(seqs, left):
        L = max(map(len, seqs))
        ids = [([pad_id] * (L - len(s)) + s) if left else (s + [pad_id] * (L - len(s))) for s in seqs]
        mask = [([0] * (L - len(s)) + [1] * len(s)) if left else ([1] * len(s) + [0] * (L - len(s))) for s in seqs]
        return torch.tensor(ids, device=device), torch.tensor(mask, device=device)
    rows = [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs]
    return [t for k, left in ((0, True), (1, False), (2, False)) for t in padded([r[k] for r in rows], left)]

# -----------------------------------------------------------------------------
# the ledger: pairs.jsonl

class Ledger:
    """pairs.jsonl, written as the labeller answers: each pair appended and flushed as it is given (a
    person's answer is never lost), before any training on it. Under torchrun the ranks' shares are
    gathered in prompt order and rank 0 writes. It counts the run's labels as it writes them.

    A resumed run (`at`: its checkpoint's label count) finds the pairs it bought after the checkpoint
    already here: its labeller answers with them (replay, below), and they are checked against the line
    on disk instead of written again. A torn last line (a kill in the middle of a write) is dropped."""
    def __init__(self, args, w, run, ck=None):
        self.path = os.path.join(args.out, "pairs.jsonl")
        self.lines = read_lines(self.path) if ck else []     # a fresh run starts an empty file
        if ddp.rank == 0:
            write_text(self.path, "".join(self.lines))
        self.saved = [parse(line, n, self.path, w.policy.config.vocab_size) for n, line in enumerate(self.lines, 1)]
        if ck and ddp.rank == 0:
            print(f"resuming {args.out} at {ck['labels']} labels; {len(self.lines) - ck['labels']} labels bought after "
                  f"that checkpoint are reused, not bought again")
        # no bar on other ranks, nor where a person reads the pairs in this terminal; otherwise tqdm decides
        # (TQDM_DISABLE=1 turns it off: a `disable` passed here would override that)
        quiet = dict(disable=True) if ddp.rank > 0 or w.labeller.terminal else {}
        self.bar = tqdm(total=args.labels, initial=run.labels, desc=f"{args.sampler}/{args.mode}", unit="label", **quiet)

    def replay(self, labeller):
        """The labeller of a resumed run: Replay(labeller) over the pairs on disk; `labeller` itself in a fresh one."""
        return Replay(labeller, self.saved) if self.saved else labeller

    def keep(self, run, new):
        """A batch's pairs, `new` yielding this rank's as they are labelled: each one past what is on disk
        appended and flushed as it comes, each one already on disk checked against its line. Counts the
        labels (paper Table 1: two responses judged per label), the reused ones and what the labeller
        said. -> the whole batch, every rank's"""
        mine = []
        for p in new:
            mine.append(p)
            if not ddp.on:
                self.write(run.labels + len(mine) - 1, [p])
        batch = ddp.gather(mine)
        if ddp.on and ddp.rank == 0:
            self.write(run.labels, batch)
        reused = min(len(batch), max(0, len(self.lines) - run.labels))
        run.labels, run.judged, run.reused = run.labels + len(batch), run.judged + 2 * len(batch), run.reused + reused
        answered = [p for p in batch if not p.skipped]
        run.tally = dict(answered=run.tally["answered"] + len(answered), skipped=run.tally["skipped"] + len(batch) - len(answered),
                         agreed=run.tally["agreed"] + sum(p.chosen_score > p.rejected_score for p in answered))
        self.bar.update(len(batch))
        return batch

    def write(self, first, pairs):
        """Pairs of the run's indices first, first+1, ...: appended where they are new, checked where on disk."""
        new = []
        for i, p in enumerate(pairs, first):
            if i >= len(self.lines):
                new.append(line(p))
            elif line(p) != self.lines[i]:
                raise UserError(f"--resume: {self.path} line {i + 1} is not the pair this run makes there again -- the "
                                f"line was changed since it was written; train on its labels with --from_pairs "
                                f"{self.path} and another --out")
        if new:
            still_ours()
            with open(self.path, "a") as f:
                f.write("".join(new))

    def reread(self, run, source, n, batch_size):
        """--from_pairs: the next n pairs of the source file, in their order, instead of sampling and
        labelling (nothing is bought); written to this run's pairs.jsonl as new pairs are."""
        got = []
        for i in range(0, n, batch_size):
            batch = [dataclasses.replace(p, round=run.round, step=run.steps)
                     for p in source[run.labels:run.labels + min(batch_size, n - i)]]
            got += self.keep(run, iter(ddp.share(batch)))        # every rank its share, as collect's are
        return got

    def close(self):
        self.bar.close()

class Replay(Labeller):
    """The labeller of a resumed run: the pairs it bought after its checkpoint, on disk, answer first, then
    `labeller` answers the rest. The sampler has drawn those pairs again (so every generator ends where it
    would have); each saved pair must be of the prompt and responses just drawn, and the labeller rechecks
    the labels it can check for free (a reward model re-scores them). So collect reads the same in a
    fresh run and a resumed one, and no label is bought twice."""
    def __init__(self, labeller, saved):
        self.labeller, self.saved, self.terminal = labeller, saved, labeller.terminal

    def report(self, tally):
        return self.labeller.report(tally)

    def label(self, prompts, a, b, u, n=0):
        k = max(0, min(len(prompts), len(self.saved) - n))       # of these pairs, those on disk
        labels = []
        for j, p in enumerate(self.saved[n:n + k]):
            if p.prompt != prompts[j] or sorted([p.chosen_ids, p.rejected_ids]) != sorted([a[j].ids, b[j].ids]):
                raise UserError(f"--resume: pairs.jsonl line {n + j + 1} is not the pair this run drew there ("
                                f"{'another prompt' if p.prompt != prompts[j] else 'other responses'}: a line was "
                                f"removed or edited, or this machine samples differently from the one that bought it) "
                                f"-- train on its labels with --from_pairs and another --out")
            a_wins = (p.chosen_ids, p.chosen_src, p.chosen_logp) == (a[j].ids, a[j].src, a[j].logp)
            labels.append(Label(a_wins, *((p.chosen_score, p.rejected_score) if a_wins else (p.rejected_score, p.chosen_score)),
                                p.skipped))
        # the labeller says again what it can for free: every field it knows must be the stored one (which of
        # two identical responses won cannot be told from the record, nor does it change it)
        again = self.labeller.relabel(prompts[:k], a[:k], b[:k], u[:k]) if k else None
        for j, (fresh, stored) in enumerate(zip(again or [], labels)):
            if not all(f is None or f == s or (name == "a_wins" and a[j] == b[j])
                       for name, f, s in zip(Label._fields, fresh, stored)):
                raise UserError(f"--resume: pairs.jsonl line {n + j + 1} holds a label or scores its labeller does "
                                f"not give that pair -- the line was edited; train on its labels with --from_pairs and "
                                f"another --out")
        yield from labels
        if k < len(prompts):
            yield from self.labeller.label(prompts[k:], a[k:], b[k:], u[k:], n + k)
