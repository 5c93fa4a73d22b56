"""The oracle: text in, re-tokenised with its own tokenizer, Bradley-Terry labels, label counting."""
import math

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

import load
import world
from oracle import Oracle

def standin_reward_model(tmp_path, with_pad):
    """A hub-style reward model saved to a folder: GPT-2 classifier, byte-level BPE tokenizer."""
    tok = world._bpe_tokenizer(["customer : my lamp arrived broken . agent : sorry about that ."] * 50, 280)
    if not with_pad:       # like many hub tokenizers (GPT-2's, Llama's): no pad token
        tok.pad_token = None
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(GPT2Config(vocab_size=len(tok), n_positions=64, n_layer=1, n_head=2,
                                                     n_embd=16, num_labels=1, pad_token_id=tok.pad_token_id))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return load.load_oracle(str(tmp_path))

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
    with pytest.raises(world.WorldError, match="num_labels=1"):
        load.load_oracle(str(tmp_path))

def fixed_oracle(scores_a, scores_b, how="bt"):
    o = Oracle(None, None, how=how)
    calls = iter([torch.tensor(scores_a), torch.tensor(scores_b)])
    o.score = lambda prompts, responses: next(calls)
    return o

def test_bradley_terry_labels_are_sigmoid_of_the_score_gap():
    n, gap = 20000, 1.2
    o = fixed_oracle([gap] * n, [0.0] * n)
    u = torch.rand(n, generator=torch.Generator().manual_seed(0))
    a_wins = torch.tensor([l.a_wins for l in o.label(["p"] * n, ["a"] * n, ["b"] * n, u)])
    p = 1 / (1 + math.exp(-gap))                                  # 0.7685
    assert abs(a_wins.float().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert o.labels == n and o.judged == 2 * n                   # every label counted

def test_argmax_labels_prefer_the_higher_score():
    o = fixed_oracle([0.1, 2.0, -1.0], [0.0, 3.0, -2.0], how="argmax")
    a_wins = torch.tensor([l.a_wins for l in o.label(["p"] * 3, ["a"] * 3, ["b"] * 3, torch.zeros(3))])
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
