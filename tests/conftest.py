"""Shared fixtures: tiny models and a tiny embedded world, all built on the CPU in seconds."""
import os
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")       # tests never touch the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import world  # noqa: E402

TINY_WORLD = dict(world.WORLD, sft_examples=1500, sft_epochs=1, rm_examples=1500, rm_epochs=1,
                  n_layer=1, n_embd=32, rm_layer=1, rm_embd=32, rm_vocab=300)

def tiny_lm(seed, vocab=12, n_positions=48, dtype=torch.float64):
    """A random GPT-2 small enough to decode by brute force (float64: cached == uncached to ~1e-12)."""
    torch.manual_seed(seed)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=n_positions, n_layer=2, n_head=2, n_embd=16,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=1))
    return m.to(dtype).eval()

@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("world"))
    world.build(d, TINY_WORLD)
    return d
