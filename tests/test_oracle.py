"""The oracle: text in, re-tokenised with its own tokenizer, Bradley-Terry labels, label counting."""
import math
import os
from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification

import load
import world
from errors import UserError
from conftest import standin_reward_model
from oracle import Oracle
from pairs import Response

PROMPTS = ["customer : my lamp arrived broken . agent :", "customer : hi . agent :", "customer : my lamp . agent :"]
REPLIES = ["sorry about that .", "sorry about that . sorry about that . we will", "."]

def test_batched_scores_equal_one_by_one(tmp_path):
    """Right padding and masks from the tokenizer: a reply scores the same alone or in a padded batch."""
    for with_pad in (True, False):
        model, tok = standin_reward_model(tmp_path / str(with_pad), with_pad)
        assert tok.pad_token is not None and tok.padding_side == "right"
        o = Oracle(model, tok)
        batch = o.score(PROMPTS, REPLIES)
        alone = torch.cat([o.score([p], [r]) for p, r in zip(PROMPTS, REPLIES)])
        torch.testing.assert_close(batch, alone, rtol=0, atol=1e-5)
        assert batch.std() > 0

def test_a_classifier_with_two_labels_is_refused(tmp_path):
    tok = world._bpe_tokenizer(["a b c"] * 10, 270)
    GPT2ForSequenceClassification(GPT2Config(vocab_size=len(tok), n_positions=16, n_layer=1, n_head=2, n_embd=8,
                                             num_labels=2, pad_token_id=tok.pad_token_id)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="num_labels=1"):
        load.load_oracle(str(tmp_path))

def replies(text, n):
    """n sampled responses that read `text`, as a labeller receives them."""
    return [Response(text, [], "pi", 0.0, False) for _ in range(n)]

def fixed_oracle(scores_a, scores_b, how="bt"):
    o = Oracle(None, None, how=how)
    calls = iter([torch.tensor(scores_a), torch.tensor(scores_b)])
    o.score = lambda prompts, responses: next(calls)
    return o

def test_bradley_terry_labels_are_sigmoid_of_the_score_gap():
    n, gap = 20000, 1.2
    o = fixed_oracle([gap] * n, [0.0] * n)
    u = torch.rand(n, generator=torch.Generator().manual_seed(0))
    a_wins = torch.tensor([l.a_wins for l in o.label(["p"] * n, replies("a", n), replies("b", n), u)])
    p = 1 / (1 + math.exp(-gap))                                  # 0.7685
    assert abs(a_wins.float().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert o.labels == n and o.judged == 2 * n                   # every label counted

def test_argmax_labels_prefer_the_higher_score():
    o = fixed_oracle([0.1, 2.0, -1.0], [0.0, 3.0, -2.0], how="argmax")
    a_wins = torch.tensor([l.a_wins for l in o.label(["p"] * 3, replies("a", 3), replies("b", 3), torch.zeros(3))])
    assert a_wins.tolist() == [True, False, True] and o.labels == 3

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}")   # a minimal chat template

def test_a_chat_reward_model_reads_its_template(tmp_path):
    """With a chat template (as Skywork-Reward has), the oracle scores [user: prompt, assistant: response]
    rendered by it, tokenised without a second set of special tokens; 'plain' forces the plain join."""
    model, tok = standin_reward_model(tmp_path, with_pad=True)
    tok.chat_template = CHAT
    auto, plain = Oracle(model, tok), Oracle(model, tok, fmt="plain")
    rendered = [f"<|user|>{p}<|assistant|>{r}" for p, r in zip(PROMPTS, REPLIES)]
    assert [auto.text(p, r) for p, r in zip(PROMPTS, REPLIES)] == rendered
    by_hand = torch.cat([model(**tok(t, return_tensors="pt", truncation=True, add_special_tokens=False)).logits[:, 0] for t in rendered])
    torch.testing.assert_close(auto.score(PROMPTS, REPLIES), by_hand.detach(), rtol=0, atol=1e-5)
    assert plain.text(PROMPTS[0], REPLIES[0]) == PROMPTS[0] + " " + REPLIES[0]
    assert not torch.allclose(plain.score(PROMPTS, REPLIES), auto.score(PROMPTS, REPLIES))
    tok.chat_template = None
    assert Oracle(model, tok).text("p", "r") == "p r"          # auto without a template: the plain join

def test_a_score_does_not_depend_on_the_texts_beside_it(tiny_world):
    """A resumed run scores part of a batch, a check re-scores one pair: every text scores exactly the
    same alone, in a batch, and beside texts of other lengths (padding to the batch's longest would move
    the 7th digit)."""
    o = Oracle(*load.load_oracle(os.path.join(tiny_world, "oracle")))
    prompts = [PROMPTS[i % 3] for i in range(12)]
    replies = [" ".join(["sorry about that ."] * (1 + i % 7)) for i in range(12)]
    together = o.score(prompts, replies)
    alone = torch.cat([o.score([p], [r]) for p, r in zip(prompts, replies)])
    reversed_half = o.score(prompts[6:][::-1], replies[6:][::-1]).flip(0)
    assert torch.equal(together, alone) and torch.equal(together[6:], reversed_half)

def test_a_chat_template_with_a_bos_reaches_the_oracle_with_exactly_one(tmp_path):
    """A Llama-3-style tokenizer adds a BOS itself and its chat template writes one too: what the reward
    model reads must hold one BOS, not two."""
    from tokenizers.processors import TemplateProcessing
    model, tok = standin_reward_model(tmp_path, with_pad=True)
    tok.add_special_tokens({"bos_token": "<bos>"})
    bos = tok.bos_token_id
    tok._tokenizer.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    tok.chat_template = "{{ bos_token }}" + CHAT
    assert tok("x")["input_ids"][0] == bos                       # the tokenizer does add one by itself
    seen = []
    class Reading(torch.nn.Module):                              # the reward model, recording what it reads
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
        def forward(self, input_ids, attention_mask):
            seen.extend(i[m.bool()].tolist() for i, m in zip(input_ids, attention_mask))
            return SimpleNamespace(logits=torch.zeros(len(input_ids), 1))
    Oracle(Reading(), tok).score(PROMPTS[1:2] * 3, ["sorry about that .", ".", "sorry"])   # short: none is cut
    assert len(seen) == 3 and all(ids.count(bos) == 1 and ids[0] == bos for ids in seen), seen
