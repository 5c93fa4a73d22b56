"""--oracle human: a person labels through stdin. Driven here by a pipe of answers: each answer lands
in pairs.jsonl as given, a pipe that runs dry ends the session like a kill, and --resume asks only
for the rest, ending where a session given every answer at once ends."""
import io
import json
import os
import re
from types import SimpleNamespace

import pytest
import torch

import train
from oracle import Person
from pairs import Response
from conftest import MICRO, TIMINGS, read_jsonl

def human_args(d):
    """The tiny world's policy and prompts; a person labels, the world's oracle judges."""
    return ["--oracle", "human", "--judge", os.path.join(d, "oracle"), "--policy", os.path.join(d, "policy"),
            "--prompts", os.path.join(d, "prompts")]

def session(argv, answers, monkeypatch, capsys):
    """train.main with `answers` typed on stdin -> (exit code, [(shown first, shown second) per pair asked])"""
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(a + "\n" for a in answers)))
    capsys.readouterr()
    try:
        train.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    assert code in (0, 1), out.err
    out = out.out
    # each reply as shown: wrapped at whole words, a reply cut at --max_new_tokens marked "(cut off)"
    shown = [tuple(" ".join(r.split()).removesuffix(" (cut off)") for r in pair)
             for pair in re.findall(r"\n\[1\] (.*?)\n\n\[2\] (.*?)\nwhich reply", out, re.S)]
    return code, shown, out

# 32 pairs: 'x' is no answer and is asked again; s skips; 1 and 2 pick
ANSWERS = ["1", "2", "x", "s", "2", "1", "1", "2", "1"] + ["2", "1", "1", "s"] * 6

def check_pairs(pairs, shown, answers):
    """Every pair on disk is the one shown, labelled as answered."""
    answers = [a for a in answers if a in "12s"]
    assert len(pairs) == len(shown) == len(answers)
    for p, (first, second), a in zip(pairs, shown, answers):
        assert p["skipped"] == (a == "s")
        if a != "s":
            picked, other = (first, second) if a == "1" else (second, first)
            assert (p["chosen"], p["rejected"]) == (picked, other)

@pytest.fixture(params=[1, 2], ids=["1 thread", "2 threads"])
def threads(request):
    """The comparison of two sittings must hold on any thread count (the rounding of the sums changes)."""
    n = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(n)

def test_a_session_through_stdin_resumes_where_the_input_ran_dry(tiny_world, tmp_path, monkeypatch, capsys, threads):
    argv = ["--sampler", "pilaf"] + MICRO + human_args(tiny_world)
    whole = str(tmp_path / "whole")
    code, shown, out = session(argv + ["--out", whole], ANSWERS, monkeypatch, capsys)
    assert code == 0, out
    pairs = read_jsonl(os.path.join(whole, "pairs.jsonl"))
    check_pairs(pairs, shown, ANSWERS)
    assert "'x' is not an answer" in out and "pair 32 of 32" in out
    # both orders are shown: the order on screen is random, not always a then b
    assert len({(p["chosen"] == f) for p, (f, _) in zip(pairs, shown) if not p["skipped"]}) == 2
    last = read_jsonl(os.path.join(whole, "metrics.jsonl"))[-1]
    answered = [p for p in pairs if not p["skipped"]]
    assert (last["answered"], last["skipped"]) == (len(answered), 7)
    assert last["agree"] == pytest.approx(sum(p["chosen_score"] > p["rejected_score"] for p in answered) / len(answered))
    assert f"the judge agreed with {last['agree']:.0%}" in out
    assert last["step"] == 4 and last["kl"] > 0

    # the same session in two sittings: the input runs dry after 20 answers (exit 1, nothing lost) ...
    split = str(tmp_path / "split")
    first_part = ANSWERS[:21]                                        # 20 answers and the 'x'
    code, shown1, out = session(argv + ["--out", split], first_part, monkeypatch, capsys)
    assert code == 1 and f"--resume {split}" in out
    check_pairs(read_jsonl(os.path.join(split, "pairs.jsonl")), shown1[:20], first_part)   # the 21st was shown, not answered
    assert not os.path.exists(os.path.join(split, "summary.json"))
    # ... and --resume asks only for the 12 pairs not answered, then ends as the one sitting did
    code, shown2, out = session(["--resume", split], ANSWERS[21:], monkeypatch, capsys)
    assert code == 0 and len(shown2) == 12 and "pair 21 of 32" in out and "pair 20 of 32" not in out
    assert read_jsonl(os.path.join(split, "pairs.jsonl")) == pairs
    again = json.load(open(os.path.join(split, "summary.json")))
    assert {k: v for k, v in again.items() if k not in TIMINGS} == {k: v for k, v in last.items() if k not in TIMINGS}
    assert again["reused"] == 20

def test_q_stops_at_once_and_keeps_every_answer(tiny_world, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    code, shown, text = session(["--out", out] + MICRO + human_args(tiny_world), ["1", "2", "q", "1"], monkeypatch, capsys)
    assert code == 0 and len(shown) == 3 and "stopped:" in text
    check_pairs(read_jsonl(os.path.join(out, "pairs.jsonl")), shown[:2], ["1", "2"])

def test_skipped_pairs_are_never_trained_on(tiny_world, tmp_path, monkeypatch, capsys):
    """Every pair skipped: no step is taken and the policy is still the reference (KL exactly 0)."""
    out = str(tmp_path / "run")
    argv = ["--out", out, "--labels", "8", "--batch_size", "8", "--eval_prompts", "4", "--eval_samples", "1",
            "--max_new_tokens", "10"] + human_args(tiny_world)
    code, shown, _ = session(argv, ["s"] * 8, monkeypatch, capsys)
    last = read_jsonl(os.path.join(out, "metrics.jsonl"))[-1]
    assert code == 0 and len(shown) == 8 and last["step"] == 0 and last["kl"] == 0
    assert (last["answered"], last["skipped"], last["agree"]) == (0, 8, None)       # nothing to agree on

def test_the_order_shown_is_the_pairs_uniform_and_the_answer_maps_back():
    """Each pair's uniform decides which response is shown first (u < 1/2: b first), so the order on the
    screen says nothing about where a response came from; an answer '1' picks whichever was shown first."""
    class Judge:
        def score(self, prompts, texts):
            return torch.tensor([float(len(t)) for t in texts])
    a = [Response("reply a one", [5], "pi+", 0.0, False), Response("reply a two", [6], "pi+", 0.0, False)]
    b = [Response("reply b one", [7], "pi-", 0.0, False), Response("reply b two", [8], "pi-", 0.0, False)]
    screen = io.StringIO()
    person = Person(Judge(), SimpleNamespace(labels=2), io.StringIO("1\n1\n"), screen)
    labels = list(person.label(["p", "p"], a, b, torch.tensor([0.9, 0.1])))
    assert [l.a_wins for l in labels] == [True, False]                        # '1' both times: a, then b
    shown = re.findall(r"\[1\] (reply \w+ \w+)", screen.getvalue())
    assert shown == ["reply a one", "reply b two"]
    assert [(l.score_a, l.score_b) for l in labels] == [(11.0, 11.0)] * 2      # the judge's scores stay a's and b's
