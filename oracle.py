"""
The oracle: a frozen reward model standing in for the human labellers (as in the paper, where
Skywork-Reward-Llama-3.1-8B plays that part). It is the only place ground truth enters training.

It sees text only: the policy's tokens are decoded, then re-tokenised with the reward model's own
tokenizer (right padding, attention masks from that tokenizer), so any Hugging Face
sequence-classification reward model works, whatever its vocabulary. A pair is labelled by a
Bradley–Terry draw, P(a > b) = sigmoid(r(a) - r(b)), like a noisy human; `argmax` labels always
prefer the higher score. Every label is counted: that count is the annotation budget.
"""
import torch

class Oracle:
    def __init__(self, model, tokenizer, batch_size=64):
        self.model, self.tok = model, tokenizer
        self.batch_size = batch_size
        self.labels = 0       # preference labels given (one per pair)
        self.judged = 0       # responses shown to the labeller (two per label; paper Table 1)

    @torch.no_grad()
    def score(self, prompts, responses):
        """Scalar reward of each (prompt, response) text. -> (N,) float tensor on the CPU."""
        dev = next(self.model.parameters()).device
        out = []
        for i in range(0, len(prompts), self.batch_size):
            texts = [p + " " + r for p, r in zip(prompts[i:i + self.batch_size], responses[i:i + self.batch_size])]
            enc = self.tok(texts, padding=True, truncation=True, return_tensors="pt").to(dev)  # at model_max_length
            out.append(self.model(**enc).logits[:, 0].float().cpu())
        return torch.cat(out)

    def label(self, prompts, a, b, how="bt", generator=None):
        """Which of each pair the labeller prefers. -> (a_wins (N,) bool, score_a (N,), score_b (N,))"""
        sa, sb = self.score(prompts, a), self.score(prompts, b)
        if how == "bt":
            a_wins = torch.rand(len(sa), generator=generator) < torch.sigmoid(sa - sb)
        elif how == "argmax":
            a_wins = sa > sb
        else:
            raise ValueError(f"unknown labelling rule '{how}' (use bt or argmax)")
        self.labels += len(sa)
        self.judged += 2 * len(sa)
        return a_wins, sa, sb
