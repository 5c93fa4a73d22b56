"""
A labelled pair, and moving batches of them between text, token lists and tensors: the record
pairs.jsonl keeps (one JSON line per pair), reading such a file back (--resume, --from_pairs), and
the padded tensors the DPO step reads.
"""
import dataclasses
import json
import os

import torch

from world import WorldError

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
        raise WorldError(f"{path} holds {len(got)} pairs, fewer than --labels {need} -- pass --labels {len(got)} or fewer")
    return got

def read_lines(path):
    """The complete lines of a .jsonl file (a kill in the middle of a write can leave a torn last one)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.readlines()
    return [l for l in lines if l.endswith("\n")]

def parse(line, n, path, vocab_size):
    """One line of a pairs.jsonl as a Pair, checked: the fields a Pair has, integer token ids that fit
    the policy's vocabulary. Bad lines raise WorldError (one line, exit 2)."""
    fields = {f.name for f in dataclasses.fields(Pair)}
    try:
        p = Pair(**{k: v for k, v in json.loads(line).items() if k in fields})
    except (ValueError, TypeError) as e:
        raise WorldError(f"{path} line {n} is not a labelled pair ({e}) -- pass the pairs.jsonl of a run") from None
    for ids in (p.prompt_ids, p.chosen_ids, p.rejected_ids):
        if not isinstance(ids, list) or not all(type(i) is int for i in ids):
            raise WorldError(f"{path} line {n}: token ids must be a list of integers (got {ids!r:.40}) "
                             f"-- the file was changed by hand; pass the pairs.jsonl of a run")
    bad = [i for i in p.prompt_ids + p.chosen_ids + p.rejected_ids if not 0 <= i < vocab_size]
    if bad:
        raise WorldError(f"{path} line {n}: token id {bad[0]} is outside the policy's vocabulary ({vocab_size}) "
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
