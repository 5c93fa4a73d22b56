"""Bad input and folders that are not runs: one line naming the fix (exit 2), and nothing paid for is
lost: settings that would waste every label, --overwrite and --from_pairs, a folder that is not a run,
what a newcomer meets."""
import errno
import json
import os
import re
import shutil
from types import SimpleNamespace

import pytest
from datasets import Dataset, DatasetDict

import train
from conftest import MICRO, TINY_WORLD, bad, read_jsonl, world_args

# ---- settings that would waste paid labels

@pytest.mark.parametrize("argv,match", [
    (["--temperature", "0"], "--temperature 0.0 samples (almost) greedily"),
    (["--temperature", "1e-9"], "--temperature 1e-09 samples (almost) greedily"),
    (["--temperature", "nan"], "--temperature must be a finite number (got nan)"),
    (["--beta", "nan"], "--beta must be a finite number (got nan)"),
    (["--beta", "inf"], "--beta must be a finite number (got inf)"),
    (["--lr", "nan"], "--lr must be a finite number (got nan)"),
    (["--sampler", "hybrid", "--xpo_alpha", "inf"], "--xpo_alpha must be a finite number (got inf)"),
])
def test_settings_that_waste_every_label_are_refused(argv, match, tiny_world, capsys, tmp_path):
    """Greedy sampling makes both responses of a pair the same (every label a tie); a non-finite number
    turns the loss or the sampling distribution into NaN."""
    bad(argv + ["--out", str(tmp_path / "run")] + world_args(tiny_world), capsys, match)
    assert not os.path.exists(tmp_path / "run")

# ---- nothing paid for is destroyed, and a folder that is not a run is never written

def test_overwrite_moves_the_old_run_aside(tiny_world, capsys, tmp_path):
    """--overwrite starts again in a folder that holds a run; the old run, labels and all, is kept
    whole in <out>.replaced-1 (and the next one in .replaced-2), never deleted."""
    out = str(tmp_path / "run")
    train.main(["--out", out] + MICRO + world_args(tiny_world))
    first = {f: open(os.path.join(out, f)).read() for f in ("pairs.jsonl", "metrics.jsonl", "config.json")}
    capsys.readouterr()
    train.main(["--out", out, "--overwrite", "--seed", "1"] + MICRO + world_args(tiny_world))
    assert f"note: --overwrite: the run that was in {out} is kept in {out}.replaced-1" in capsys.readouterr().out
    assert {f: open(os.path.join(out + ".replaced-1", f)).read() for f in first} == first
    assert os.path.exists(os.path.join(out + ".replaced-1", "summary.json"))
    assert json.load(open(os.path.join(out, "config.json")))["seed"] == 1
    assert open(os.path.join(out, "pairs.jsonl")).read() != first["pairs.jsonl"]
    train.main(["--out", out, "--overwrite"] + MICRO + world_args(tiny_world))
    assert os.path.exists(os.path.join(out + ".replaced-2", "summary.json"))

def test_from_pairs_never_reads_the_folder_it_writes(tiny_world, capsys, tmp_path):
    """--from_pairs R/pairs.jsonl --out R --overwrite would replace the very labels it trains on."""
    out = str(tmp_path / "run")
    train.main(["--out", out] + MICRO + world_args(tiny_world))
    before = open(os.path.join(out, "pairs.jsonl")).read()
    bad(["--out", out, "--overwrite", "--from_pairs", os.path.join(out, "pairs.jsonl"), "--beta", "0.2"] + MICRO
        + world_args(tiny_world), capsys, "is inside --out")
    assert open(os.path.join(out, "pairs.jsonl")).read() == before and not os.path.exists(out + ".replaced-1")

def test_a_folder_that_is_not_a_run_is_never_written(tiny_world, capsys, tmp_path):
    """A copy of the world cache, a saved model folder, a file, a folder of someone's notes: refused
    in one line, --overwrite or not, and left exactly as it was (not even a lock file)."""
    cache = str(tmp_path / "world")
    shutil.copytree(tiny_world, cache)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    for out, match in ((cache, "holds files that are not a run's (oracle, prompts, world.json)"),
                       (os.path.join(cache, "policy"), "holds files that are not a run's"),
                       (os.path.join(cache, "world.json"), "is a file"), (str(notes), "(todo.txt)")):
        for extra in ([], ["--overwrite"]):
            before = {os.path.join(d, f): open(os.path.join(d, f), "rb").read() for d, _, fs in os.walk(cache) for f in fs}
            bad(["--out", out] + extra + MICRO + world_args(tiny_world), capsys, match)
            after = {os.path.join(d, f): open(os.path.join(d, f), "rb").read() for d, _, fs in os.walk(cache) for f in fs}
            assert before == after and os.listdir(notes) == ["todo.txt"]
    model = tmp_path / "model"                       # a config.json alone that is a model's, not a run's options
    model.mkdir()
    (model / "config.json").write_text(open(os.path.join(cache, "policy", "config.json")).read())
    bad(["--out", str(model), "--overwrite"] + MICRO + world_args(tiny_world), capsys, "not a run's options")
    assert os.listdir(model) == ["config.json"]

def test_empty_prompts_are_left_out_and_all_empty_is_refused(tiny_world, capsys, tmp_path):
    mixed = str(tmp_path / "mixed")
    prompts = ["customer : my lamp arrived broken . agent :", "", "  ", "customer : my bike is missing ! agent :"]
    DatasetDict(train=Dataset.from_dict({"prompt": prompts}), test=Dataset.from_dict({"prompt": prompts})).save_to_disk(mixed)
    w = world_args(tiny_world)
    out = str(tmp_path / "run")
    capsys.readouterr()
    train.main(["--out", out, "--prompts", mixed] + MICRO + w[:4])
    assert "note: leaving out 2 empty training prompts" in capsys.readouterr().out
    assert all(p["prompt"].strip() and p["prompt_ids"] for p in read_jsonl(os.path.join(out, "pairs.jsonl")))
    empty = str(tmp_path / "empty")
    DatasetDict(train=Dataset.from_dict({"prompt": ["", " "]}), test=Dataset.from_dict({"prompt": prompts})).save_to_disk(empty)
    bad(["--out", str(tmp_path / "run2"), "--prompts", empty] + MICRO + w[:4], capsys, "every training prompt is empty")

def test_eval_prompts_beyond_the_split_says_how_many_it_uses(tiny_world, capsys, tmp_path):
    capsys.readouterr()
    train.main(["--out", str(tmp_path / "run"), "--labels", "8", "--batch_size", "8", "--eval_prompts", "100",
                "--eval_samples", "1", "--max_new_tokens", "8"] + world_args(tiny_world))
    assert "note: --eval_prompts 100 is more than the 30 held-out prompts: evaluating on all 30" in capsys.readouterr().out

# ---- what a newcomer meets: every message leads somewhere that works

def test_messages_about_a_folder_lead_somewhere_that_works(tiny_world, capsys, tmp_path):
    out = str(tmp_path / "run")
    argv = ["--out", out] + MICRO + world_args(tiny_world)
    train.main(argv)
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"the run is in {out}/: summary.json, metrics.jsonl, pairs.jsonl, policy/"
    bad(argv, capsys, "holds a finished run (summary.json) -- pass another --out, or --overwrite")
    bad(["--resume", out], capsys, f"that run has finished (summary.json) -- its results are in {out}")
    started = str(tmp_path / "started")            # stopped while starting: a config, no checkpoint, no label
    os.makedirs(started)
    open(os.path.join(started, "config.json"), "w").write(open(os.path.join(out, "config.json")).read())
    bad(["--resume", started], capsys, "no checkpoint yet: it was stopped while starting, before it bought any label "
                                       "-- run its command again, without --resume")
    assert train.main(["--out", started] + MICRO + world_args(tiny_world))["labels"] == 32   # and that works

def test_a_person_sees_whole_words_and_a_cut_reply_marked(monkeypatch):
    import io
    from oracle import Person
    from pairs import Response
    monkeypatch.setenv("COLUMNS", "44")
    words = ("sorry about that . we will find the missing kettle . your kettle matters to us . have a nice day .")
    first, second = Response(words, [], "pi", 0.0, cut=False), Response(words + " we will", [], "pi", 0.0, cut=True)
    screen = io.StringIO()
    assert Person(None, SimpleNamespace(labels=8), io.StringIO("2\n"), screen).ask("customer : my kettle is missing . agent :", first, second,
                                                           "pair 1 of 8") == 1
    shown = screen.getvalue()
    assert max(len(l) for l in shown.splitlines() if not l.startswith("which")) <= 44
    one, two = shown.split("[1] ")[1].split("\nwhich reply")[0].split("[2] ")
    assert " ".join(one.split()) == words and " ".join(two.split()) == words + " we will (cut off)"

def test_a_J_under_another_beta_says_so(tiny_world, capsys, tmp_path):
    first = str(tmp_path / "first")
    train.main(["--out", first] + MICRO + world_args(tiny_world))
    capsys.readouterr()
    train.main(["--out", str(tmp_path / "again"), "--beta", "0.2", "--from_pairs", os.path.join(first, "pairs.jsonl")]
               + MICRO + world_args(tiny_world))
    assert ("note: J here is reward - 0.2*KL; the run these pairs come from measured its J with beta 0.1"
            in capsys.readouterr().out)

def test_help_shows_each_default_once():
    import options
    text = options.parser().format_help()
    assert "(default: None)" not in text and "(default: False)" not in text
    entries = re.split(r"\n  (?=-)", text)
    assert all(e.count("default") <= 1 for e in entries), [e for e in entries if e.count("default") > 1]
    assert "(default: 4096)" in text

def test_the_world_build_prints_no_library_warnings(tmp_path, capfd, caplog):
    import world
    world.build(str(tmp_path / "w"), dict(TINY_WORLD, sft_examples=200, rm_examples=200))
    err = capfd.readouterr().err
    assert "loss_type" not in err and "warn" not in err.lower(), err[-2000:]
    assert not [r for r in caplog.records if r.levelname == "WARNING"], caplog.records

# ---- realistic one-line bugs the other tests would not catch

def test_every_stored_label_is_the_oracles(tiny_world, tmp_path):
    """--label argmax: each stored pair's chosen response is the one the oracle scores higher, and the
    stored scores are exactly the oracle's when it re-scores the stored texts (catches a and b swapped
    anywhere between sampling and the record)."""
    import load
    from oracle import Oracle
    out = str(tmp_path / "run")
    train.main(["--out", out, "--label", "argmax"] + MICRO + world_args(tiny_world))
    pairs = read_jsonl(os.path.join(out, "pairs.jsonl"))
    o = Oracle(*load.load_oracle(os.path.join(tiny_world, "oracle")))
    prompts = [p["prompt"] for p in pairs]
    chosen, rejected = o.score(prompts, [p["chosen"] for p in pairs]), o.score(prompts, [p["rejected"] for p in pairs])
    assert chosen.tolist() == [p["chosen_score"] for p in pairs] and rejected.tolist() == [p["rejected_score"] for p in pairs]
    assert all(c >= r for c, r in zip(chosen.tolist(), rejected.tolist()))
    assert sum(c > r for c, r in zip(chosen.tolist(), rejected.tolist())) > len(pairs) // 2     # not all ties

def test_evaluation_samples_at_temperature_1_whatever_the_training_temperature(tiny_world, tmp_path):
    first = []
    for t in ("0.5", "1"):
        out = str(tmp_path / t)
        train.main(["--out", out, "--temperature", t] + MICRO + world_args(tiny_world) + ["--labels", "8"])
        first.append({k: read_jsonl(os.path.join(out, "metrics.jsonl"))[0][k] for k in ("reward", "kl", "J", "len")})
    assert first[0] == first[1]

# ---- what used to end in a traceback: one line each

def test_a_seed_out_of_range_is_refused(tiny_world, capsys, tmp_path):
    bad(["--seed", str(2 ** 64), "--out", str(tmp_path / "run")] + world_args(tiny_world), capsys, "--seed must be between 0")

def test_a_folder_it_cannot_write_is_said_in_one_line(tiny_world, monkeypatch, capsys, tmp_path):
    """A read-only folder (root ignores permissions, so the refusal is played by the write itself)."""
    import folder
    def read_only(path, text):
        raise PermissionError(errno.EACCES, "Permission denied", path)
    monkeypatch.setattr(folder, "write_text", read_only)
    bad(["--out", str(tmp_path / "run")] + MICRO + world_args(tiny_world), capsys, "Permission denied) -- make the folder writable")

def test_a_world_cache_that_is_a_file_is_said_in_one_line(capsys, tmp_path):
    (tmp_path / "cache").write_text("")
    bad(["--world", str(tmp_path / "cache" / "world"), "--out", str(tmp_path / "run")], capsys, "set PILAF_CACHE")

def test_compares_help_shows_no_default_of_none(capsys):
    import compare
    with pytest.raises(SystemExit):
        compare.get_args(["--help"])
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "(default: online)" in text

def test_activation_checkpointing_on_a_model_that_names_no_blocks_is_refused(tiny_world, monkeypatch, capsys, tmp_path):
    """--activation_checkpointing recomputes the blocks a model names in _no_split_modules; a model that
    names none would run with nothing recomputed, the option silently doing nothing."""
    from transformers.models.gpt2.modeling_gpt2 import GPT2PreTrainedModel   # every GPT-2 class names its blocks here
    monkeypatch.setattr(GPT2PreTrainedModel, "_no_split_modules", None)
    out = tmp_path / "run"
    bad(["--activation_checkpointing", "--out", str(out)] + MICRO + world_args(tiny_world), capsys,
        "names no transformer blocks (_no_split_modules) -- run without it")
    assert not out.exists()
