"""
The oracle: a frozen reward model standing in for the human labellers (as in the paper, where
Skywork-Reward-Llama-3.1-8B plays that part). It is the only place ground truth enters training.

It sees text only: the policy's tokens are decoded, then re-tokenised with the reward model's own
tokenizer (right padding, attention masks from that tokenizer), so any Hugging Face
sequence-classification reward model works, whatever its vocabulary. A pair is labelled by a
Bradley–Terry draw, P(a > b) = sigmoid(r(a) - r(b)), like a noisy human; `argmax` labels always
prefer the higher score. Every label is counted: that count is the annotation budget.

What the reward model reads: a model trained on a chat template (Skywork-Reward, the paper's oracle)
scores the conversation [user: prompt, assistant: response] rendered by its tokenizer's template;
any other gets the plain join `prompt + " " + response`. `fmt` = "auto" picks by whether the
tokenizer has a chat template; "chat" or "plain" force one.

A person can take the oracle's place (Person, below: train.py --oracle human); a reward model then
still scores the evaluations (--judge), and each answered pair, to count how often the two agree.
"""
import torch

class Oracle:
    def __init__(self, model, tokenizer, batch_size=64, fmt="auto"):
        self.model, self.tok = model, tokenizer
        self.chat = fmt == "chat" or (fmt == "auto" and bool(getattr(tokenizer, "chat_template", None)))
        self.batch_size = batch_size
        self.labels = 0       # preference labels given (one per pair)
        self.judged = 0       # responses shown to the labeller (two per label; paper Table 1)

    @torch.inference_mode()
    def score(self, prompts, responses):
        """Scalar reward of each (prompt, response) text. -> (N,) float tensor on the CPU."""
        dev = next(self.model.parameters()).device
        out = []
        for i in range(0, len(prompts), self.batch_size):
            texts = [self.text(p, r) for p, r in zip(prompts[i:i + self.batch_size], responses[i:i + self.batch_size])]
            # a rendered template already holds its special tokens (BOS...): the tokenizer must not add them twice
            enc = self.tok(texts, padding=True, truncation=True, return_tensors="pt",
                           add_special_tokens=not self.chat).to(dev)          # truncated at model_max_length
            out.append(self.model(**enc).logits[:, 0].float().cpu())
        return torch.cat(out)

    def text(self, prompt, response):
        """What the reward model reads for one (prompt, response)."""
        if self.chat:
            return self.tok.apply_chat_template([{"role": "user", "content": prompt},
                                                 {"role": "assistant", "content": response}], tokenize=False)
        return prompt + " " + response

    def label(self, prompts, a, b, how="bt", generator=None, u=None):
        """Which of each pair the labeller prefers. -> (a_wins (N,) bool, score_a (N,), score_b (N,))
        Bradley-Terry draws one uniform per pair from `generator`, or takes them as `u` (N,)."""
        sa, sb = self.score(prompts, a), self.score(prompts, b)
        if how == "bt":
            u = torch.rand(len(sa), generator=generator) if u is None else u
            a_wins = u < torch.sigmoid(sa - sb)
        elif how == "argmax":
            a_wins = sa > sb
        else:
            raise ValueError(f"unknown labelling rule '{how}' (use bt or argmax)")
        self.labels += len(sa)
        self.judged += 2 * len(sa)
        return a_wins, sa, sb

class Person:
    """A person as the labeller (train.py --oracle human): each pair is shown in the terminal, the two
    responses in a random order, and the answer read from `inp` (a line per answer). The answer keys
    are 1 or 2 (the better response), s to skip the pair (it is kept, unlabelled, and never trained
    on) and q to stop; the end of the input stops too. Anything else is asked again."""
    KEYS = {"1": 0, "2": 1, "s": "skip", "q": "stop"}

    def __init__(self, inp, out):
        self.inp, self.out = inp, out

    def ask(self, prompt, first, second, where):
        """-> 0 (first is better), 1 (second), 'skip', 'stop' (q), or 'eof' (the input ended)."""
        rule = "-" * 72
        self.out.write(f"\n{rule}\n{where}\nprompt: {prompt}\n\n[1] {first}\n\n[2] {second}\n")
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
