"""
The labellers: who says which response of a pair is better. Every labeller has one call,

    label(prompts, a, b, u, n)  ->  yields a Label per pair, in order, as soon as it is decided

with the prompts' texts, the two responses of each pair (pairs.Response: `.text`, and `.cut` for one
that ran out of tokens before its end), one uniform u per pair from the run's label generator (a
Bradley–Terry draw, or the order a person is shown the two in), and n, how many pairs the run had
before these. A labeller that must stop (a person typed q) raises errors.Stop after the labels it
gave: the run keeps them and stops like a kill. Every labeller subclasses Labeller, which says what
else a run may ask of it and gives the defaults. A fork's labeller behind an API is one more subclass,
and one entry in LABELLERS (the end of this file): `--oracle NAME` then chooses it, and `--judge`
names the reward model that scores the evaluations.

The oracle (as in the paper, where Skywork-Reward-Llama-3.1-8B plays the part of the human labellers)
is a frozen reward model, the only place ground truth enters training. It sees text only: the
policy's tokens are decoded, then re-tokenised with the reward model's own tokenizer (right padding,
attention masks from that tokenizer), so any Hugging Face sequence-classification reward model works,
whatever its vocabulary. A pair is labelled by a Bradley–Terry draw, P(a > b) = sigmoid(r(a) - r(b)),
like a noisy human; `argmax` labels always prefer the higher score.

What the reward model reads: a model trained on a chat template (Skywork-Reward, the paper's oracle)
scores the conversation [user: prompt, assistant: response] rendered by its tokenizer's template;
any other gets the plain join `prompt + " " + response`. `fmt` = "auto" picks by whether the
tokenizer has a chat template; "chat" or "plain" force one.

A person can take the oracle's place (Person, below: train.py --oracle human); a reward model then
still scores the evaluations (--judge), and each answered pair, to count how often the two agree.
"""
import shutil
import sys
import textwrap
from typing import NamedTuple

import torch

import ddp
from errors import Stop

class Label(NamedTuple):
    a_wins: bool
    score_a: float          # the labeller's scores (a person's pairs: the judge's), kept in pairs.jsonl
    score_b: float
    skipped: bool = False   # a person skipped the pair: it is kept and never trained on

class Labeller:
    """Whoever labels the pairs. A subclass writes `label` (above); the rest has defaults."""
    terminal = False        # it shows the pairs in this terminal: no progress bar, and one process only

    def label(self, prompts, a, b, u, n=0):
        raise NotImplementedError

    def report(self, tally):
        """What metrics.jsonl reports about the labels beyond the run's counters (tally: how many pairs
        were answered and skipped so far, and in how many the chosen response scored higher)."""
        return {}

    def relabel(self, prompts, a, b, u):
        """What this labeller says again of pairs it labelled before (a resumed run checks its stored
        labels with it), where that costs nothing: a Label per pair, None in a field it cannot know
        again. None where nothing can be known again for free (a paid API, by default)."""
        return None

class Oracle(Labeller):
    PAD = 32                # tokens: every text is padded to a multiple of this, whatever else shares its forward

    def __init__(self, model, tokenizer, batch_size=64, fmt="auto", how="bt"):
        self.model, self.tok = model, tokenizer
        self.chat = fmt == "chat" or (fmt == "auto" and bool(getattr(tokenizer, "chat_template", None)))
        self.batch_size, self.how = batch_size, how
        self.labels = 0       # preference labels this oracle gave (one per pair; the run's budget is train.py's count)
        self.judged = 0       # responses it read to give them (two per label; paper Table 1)

    def score(self, prompts, responses):
        """Scalar reward of each (prompt, response) text. -> (N,) float tensor on the CPU.

        A text's score must not depend on which other texts share its forward: a resumed run scores
        part of a batch, a check re-scores a stored pair, and padding every text to its batch's longest
        changes the rounding of the model's sums in the 7th digit. So each text is padded to a length
        of its own, the next multiple of PAD tokens (at most the model's context), and texts of one
        length go through together."""
        dev = next(self.model.parameters()).device
        texts = [self.text(p, r) for p, r in zip(prompts, responses)]
        # a rendered template already holds its special tokens (BOS...): the tokenizer must not add them twice
        ids = self.tok(texts, truncation=True, add_special_tokens=not self.chat)["input_ids"] if texts else []
        lengths = [min(-(-len(i) // self.PAD) * self.PAD, self.tok.model_max_length) for i in ids]   # cut at model_max_length
        batches = [rows[k:k + self.batch_size] for L in sorted(set(lengths))
                   for rows in [[j for j, n in enumerate(lengths) if n == L]] for k in range(0, len(rows), self.batch_size)]
        out = torch.empty(len(texts))
        for k in range(ddp.most(len(batches))):     # --fsdp: as many forwards as the rank with the most, spares on filler
            part = batches[k] if k < len(batches) else []
            enc = self.tok.pad({"input_ids": [ids[j] for j in part] or [[self.tok.pad_token_id]]}, padding="max_length",
                               max_length=lengths[part[0]] if part else 1, return_tensors="pt").to(dev)
            with ddp.inference():
                scores = self.model(**enc).logits[:, 0].float().cpu()
            if part:
                out[part] = scores
        return out

    def text(self, prompt, response):
        """What the reward model reads for one (prompt, response)."""
        if self.chat:
            return self.tok.apply_chat_template([{"role": "user", "content": prompt},
                                                 {"role": "assistant", "content": response}], tokenize=False)
        return prompt + " " + response

    def label(self, prompts, a, b, u, n=0):
        labels = self.decide(prompts, a, b, u)
        self.labels += len(labels)
        self.judged += 2 * len(labels)
        yield from labels

    def decide(self, prompts, a, b, u):
        """Bradley-Terry: a wins when u < sigmoid(r(a) - r(b)); argmax: when r(a) > r(b). -> [Label]"""
        sa, sb = self.score(prompts, [x.text for x in a]), self.score(prompts, [x.text for x in b])
        if self.how not in ("bt", "argmax"):
            raise ValueError(f"unknown labelling rule '{self.how}' (use bt or argmax)")
        a_wins = u < torch.sigmoid(sa - sb) if self.how == "bt" else sa > sb
        return [Label(win, x, y) for win, x, y in zip(a_wins.tolist(), sa.tolist(), sb.tolist())]

    def relabel(self, prompts, a, b, u):
        """A reward model labels again for free, to the last bit (a text's score does not depend on what
        shares its batch)."""
        return self.decide(prompts, a, b, u)

class Person(Labeller):
    """A person as the labeller (train.py --oracle human): each pair is shown in the terminal, the two
    responses in the order the pair's uniform says, and the answer read from `inp` (a line per answer).
    The answer keys are 1 or 2 (the better response), s to skip the pair (it is kept, unlabelled, and
    never trained on) and q to stop; the end of the input stops too. Anything else is asked again.
    `judge` (a reward model) scores both responses, so the run can say how often it agrees with you."""
    KEYS = {"1": 0, "2": 1, "s": "skip", "q": "stop"}
    terminal = True         # the pairs are shown in this terminal: no progress bar over them

    def __init__(self, judge, args, inp=None, out=None):
        self.judge, self.total = judge, args.labels
        self.inp, self.out = inp or sys.stdin, out or sys.stdout

    def label(self, prompts, a, b, u, n=0):
        sa, sb = self.judge.score(prompts, [x.text for x in a]), self.judge.score(prompts, [x.text for x in b])
        for j, (p, x, y) in enumerate(zip(prompts, a, b)):
            swap = bool(u[j] < 0.5)                        # the first one shown is b when swapped
            ans = self.ask(p, *((y, x) if swap else (x, y)), f"pair {n + j + 1} of {self.total}")
            if ans in ("stop", "eof"):
                raise Stop("the input ended" if ans == "eof" else "", int(ans == "eof"), on_screen=True)
            skipped = ans == "skip"
            yield Label(skipped or (ans == 0) != swap, sa[j].item(), sb[j].item(), skipped)

    def ask(self, prompt, first, second, where):
        """Show one pair (two Response records), whole words to a line, a response that ran out of tokens
        marked. -> 0 (first is better), 1 (second), 'skip', 'stop' (q), or 'eof' (the input ended)."""
        width = max(40, min(100, shutil.get_terminal_size().columns))
        wrap = lambda head, text: textwrap.fill(text, width, initial_indent=head, subsequent_indent=" " * len(head),
                                                break_long_words=False, break_on_hyphens=False) or head
        shown = [wrap(f"[{k}] ", r.text + (" (cut off)" if r.cut else "")) for k, r in ((1, first), (2, second))]
        self.out.write(f"\n{'-' * width}\n{where}\n{wrap('prompt: ', prompt)}\n\n{shown[0]}\n\n{shown[1]}\n")
        while True:
            self.out.write("which reply is better? 1 or 2, s to skip, q to stop > ")
            self.out.flush()
            line = self.inp.readline()
            if not line:                         # the input ended (a pipe with too few answers)
                return "eof"
            key = line.strip().lower()
            if key in self.KEYS:
                return self.KEYS[key]
            self.out.write(f"'{key}' is not an answer\n")

    def relabel(self, prompts, a, b, u):
        """A person's answers cannot be known again without asking; the judge's scores can."""
        sa, sb = self.judge.score(prompts, [x.text for x in a]), self.judge.score(prompts, [x.text for x in b])
        return [Label(None, x, y, None) for x, y in zip(sa.tolist(), sb.tolist())]

    def report(self, tally):
        """Your answers so far, and the share of them where the judge scores your chosen response higher."""
        answered = tally["answered"]
        return dict(answered=answered, skipped=tally["skipped"],
                    agree=tally["agreed"] / answered if answered else None)   # None: nothing answered yet

# --oracle NAME with a NAME here: that labeller, made as LABELLERS[NAME](judge, args), with `judge` the reward
# model named by --judge (default: the embedded world's oracle); any other --oracle is a reward model, the labeller
LABELLERS = {"human": Person}
