"""The embedded world (ground truth, build, cache) and the loaders, on local stand-ins only."""
import os
import shutil

import pytest
import torch
from datasets import Dataset, DatasetDict

import load
import world
from errors import UserError
from conftest import TINY_WORLD

P = "customer : my kettle is missing . agent :"
FIX = "we will find the missing kettle ."

@pytest.mark.parametrize("reply,want", [
    (f"sorry about that . {FIX} your kettle matters to us . have a nice day .", 4.0),   # the best reply
    (FIX, 2.0),
    ("we will repair it so it is working again .", -1.0),                               # wrong fix
    (f"that is not our problem . {FIX}", 0.0),                                           # rude
    ("your lamp matters to us .", -0.5),                                                 # someone else's item
    ("sorry about that . sorry about that .", 1.0),                                      # repeats earn nothing
    ("hello . hello . hello . hello . hello . hello .", -0.6),                           # two sentences too many
    ("sorry kettle . we will find the", -1.5),                                           # garbled, then cut off
    ("", 0.0),
])
def test_true_reward_by_hand(reply, want):
    assert world.true_reward(P, reply) == pytest.approx(want)

def test_reference_replies_score_well_below_the_best():
    import random
    rng = random.Random(0)
    rs = [world.true_reward(p, world.reference_reply(i, q, rng)) for p, i, q in world.all_prompts() * 20]
    assert sum(rs) / len(rs) < 0.5 and max(rs) == 4.0

def test_tiny_world_loads_like_hub_models(tiny_world):
    policy, tok = load.load_policy(os.path.join(tiny_world, "policy"))
    rm, rm_tok = load.load_oracle(os.path.join(tiny_world, "oracle"))
    train, test = load.load_prompts(os.path.join(tiny_world, "prompts"))
    assert type(policy).__name__ == "GPT2LMHeadModel" and tok.padding_side == "left"
    assert type(rm).__name__ == "GPT2ForSequenceClassification" and rm_tok.padding_side == "right"
    assert rm_tok.get_vocab() != tok.get_vocab()            # the oracle reads text with its own tokenizer
    assert not set(train) & set(test) and len(train) + len(test) == len(world.all_prompts())
    assert tok.decode(tok(P)["input_ids"]) == P              # the word-level tokenizer round-trips

def test_build_is_the_same_on_any_number_of_threads(tmp_path):
    """The world is a function of its settings alone: built with torch on 1 thread and on 2 (another
    machine's cores), every weight is the same (a matrix product's sums split by thread would round
    differently, and every number trained from the world after them)."""
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            world.build(str(tmp_path / str(n)), TINY_WORLD)
    finally:
        torch.set_num_threads(threads)
    for part in ("policy", "oracle"):
        a = load.load_policy if part == "policy" else load.load_oracle
        m1, _ = a(str(tmp_path / "1" / part))
        m2, _ = a(str(tmp_path / "2" / part))
        for (k, v), (_, w) in zip(m1.state_dict().items(), m2.state_dict().items()):
            assert torch.equal(v, w), k

def test_ensure_uses_the_cache_and_rebuilds_when_settings_change(tiny_world, monkeypatch, tmp_path):
    d = str(tmp_path / "world")
    shutil.copytree(tiny_world, d)
    built = []
    monkeypatch.setattr(world, "build", lambda out, cfg: built.append(cfg))
    assert world.ensure(d, TINY_WORLD) == d and built == []
    world.ensure(d, dict(TINY_WORLD, seed=1))
    assert built == [dict(TINY_WORLD, seed=1)]

def test_vocabulary_mismatch_fails_clearly(tiny_world, tmp_path):
    _, tok = load.load_policy(os.path.join(tiny_world, "policy"))
    other = world._word_tokenizer(["a", "b"])
    with pytest.raises(UserError, match="same vocabulary"):
        load.check_vocab(other, tok)

@pytest.mark.parametrize("part", ["policy", "oracle", "prompts", "world.json"])
def test_a_world_missing_a_part_is_built_again(part, tiny_world, monkeypatch, tmp_path):
    """A cache with a part deleted is rebuilt whole, never handed to the loaders (whose message would
    name the wrong fix); a build killed part-way leaves a folder aside that the next build removes."""
    d = str(tmp_path / "world")
    shutil.copytree(tiny_world, d)
    (shutil.rmtree if os.path.isdir(os.path.join(d, part)) else os.remove)(os.path.join(d, part))
    killed = tmp_path / ".world-build-abc123"           # what a SIGKILL during a build leaves
    killed.mkdir()
    built = []
    monkeypatch.setattr(world, "build", lambda out, cfg: (built.append(cfg), shutil.copytree(tiny_world, out, dirs_exist_ok=True)))
    assert world.ensure(d, TINY_WORLD) == d and built == [TINY_WORLD]
    assert sorted(os.listdir(d)) == sorted(world.PARTS) and not killed.exists()
    assert sorted(os.listdir(tmp_path)) == [".world.lock", "world"]

def test_a_world_cache_that_is_a_file_says_so(tmp_path):
    (tmp_path / "cache").write_text("")
    with pytest.raises(UserError, match="cannot make the world's cache .* -- set PILAF_CACHE"):
        world.ensure(str(tmp_path / "cache" / "world"), TINY_WORLD)

def test_a_folder_that_is_not_a_world_is_never_replaced(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds no world"):
        world.ensure(str(tmp_path), TINY_WORLD)
    assert (tmp_path / "notes.txt").read_text() == "mine"

def test_missing_folder_and_offline_hub_name_fail_clearly(tmp_path):
    with pytest.raises(UserError, match="nope' does not exist -- pass a folder saved with save_pretrained"):
        load.check_name("policy", str(tmp_path / "nope"))
    with pytest.raises(UserError, match="has no config.json"):
        load.check_name("policy", str(tmp_path))
    with pytest.raises(UserError, match="cannot load policy 'no-such-org/no-such-model'"):
        load.check_name("policy", "no-such-org/no-such-model")

def save_prompts(path, **splits):
    DatasetDict({k: Dataset.from_dict(v) for k, v in splits.items()}).save_to_disk(str(path))
    return str(path)

def test_prompt_formats_hh_and_imdb(tmp_path):
    hh = "\n\nHuman: my lamp broke\n\nAssistant: sorry!\n\nHuman: and now?\n\nAssistant: we will fix it"
    d = save_prompts(tmp_path / "hh", train={"chosen": [hh]}, test={"chosen": [hh]})
    train, _ = load.load_prompts(d, "chosen", "hh")
    assert train == ["\n\nHuman: my lamp broke\n\nAssistant: sorry!\n\nHuman: and now?\n\nAssistant:"]
    d = save_prompts(tmp_path / "imdb", train={"text": ["What a<br />film , truly one of the best I have seen"]},
                     test={"text": ["Bad."]})
    train, test = load.load_prompts(d, "text", "imdb")
    assert train == ["What a film , truly one of the"]   # the first 8 words and test == ["Bad."]

def test_prompt_data_set_errors_name_the_fix(tmp_path):
    d = save_prompts(tmp_path / "hh", train={"chosen": ["no turns here"]}, test={"chosen": ["b"]})
    with pytest.raises(UserError, match="--prompt_format raw"):
        load.load_prompts(d, "chosen", "hh")
    d = save_prompts(tmp_path / "ints", train={"text": [1, 2]}, test={"text": ["b"]})
    with pytest.raises(UserError, match="non-empty column of strings"):
        load.load_prompts(d, "text")
    d = save_prompts(tmp_path / "p", train={"text": ["a"]}, test={"text": ["b"]})
    with pytest.raises(UserError, match="no column 'prompt'.*--prompt_column"):
        load.load_prompts(d)
    with pytest.raises(UserError, match="'valid' splits"):
        load.load_prompts(d, "text", test_split="valid")
