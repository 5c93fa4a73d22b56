"""Runs that survive: checkpoints, --resume after a SIGKILL, --from_pairs, a non-finite loss."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import oracle
import train
from conftest import MICRO, TIMINGS, bad, lines, read_jsonl, weights, world_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
def run_train(argv, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")   # one thread: the same sums in every process
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py")] + argv, env=env, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)

@pytest.mark.parametrize("mode", ["online", "iterative"])
def test_a_killed_run_resumes_to_the_same_numbers(mode, tiny_world, tmp_path):
    """SIGKILL mid-run after some labels were bought past the last checkpoint, then --resume: the
    finished run's pairs.jsonl, metrics.jsonl (timings aside) and policy equal an uninterrupted run's,
    and the labels bought after the checkpoint are reused, not bought again."""
    if mode == "online":
        # 12 rounds of 16 pairs, checkpoints every 48 labels, evaluations every 32: killed once the evaluation at
        # 64 is written, after the checkpoint at 48, which holds the statistics of a step taken since the
        # evaluation at 32 (so the resume must drop one metrics line and carry one step's statistics)
        argv, kill_at, evals = ["--sampler", "pilaf", "--labels", "192", "--batch_size", "16", "--save_every", "48"], 64, 3
    else:                  # 2 rounds of 96 pairs (round 1 vanilla), checkpoint after round 1; killed in round 2
        argv, kill_at, evals = ["--sampler", "hybrid", "--mode", "iterative", "--iterations", "2", "--labels", "192",
                                "--batch_size", "16", "--save_every", "96"], 128, 0
    argv += ["--eval_every", "32", "--eval_prompts", "8", "--eval_samples", "2", "--max_new_tokens", "12"] + world_args(tiny_world)
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    p = run_train(argv + ["--out", full])
    assert p.wait(timeout=600) == 0, p.stdout.read()

    p = run_train(argv + ["--out", cut])
    while (lines(os.path.join(cut, "pairs.jsonl")) < kill_at or lines(os.path.join(cut, "metrics.jsonl")) < evals) \
            and p.poll() is None:
        time.sleep(0.002)
    p.send_signal(signal.SIGKILL)
    p.wait()
    p.stdout.close()
    assert not os.path.exists(os.path.join(cut, "summary.json")), "the run ended before it could be killed"
    with open(os.path.join(cut, "checkpoint.json")) as f:
        saved = json.load(f)["labels"]
    on_disk = lines(os.path.join(cut, "pairs.jsonl"))
    assert on_disk > saved                                   # labels were bought after the last checkpoint
    if mode == "online":
        assert saved == 48 and lines(os.path.join(cut, "metrics.jsonl")) == 3

    p = run_train(["--resume", cut])
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    assert f"resuming {cut} at {saved} labels; {on_disk - saved} labels bought after" in out
    assert open(os.path.join(cut, "pairs.jsonl")).read() == open(os.path.join(full, "pairs.jsonl")).read()
    m_full, m_cut = (read_jsonl(os.path.join(d, "metrics.jsonl")) for d in (full, cut))
    assert [{k: v for k, v in m.items() if k not in TIMINGS} for m in m_cut] == \
           [{k: v for k, v in m.items() if k not in TIMINGS} for m in m_full]
    assert m_cut[-1]["reused"] == on_disk - saved and m_full[-1]["reused"] == 0
    a, b = weights(full), weights(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)

def test_a_checkpoint_holds_what_resume_needs(tiny_world, tmp_path):
    out = str(tmp_path / "run")
    train.main(["--out", out, "--save_every", "16"] + MICRO + world_args(tiny_world))
    with open(os.path.join(out, "checkpoint.json")) as f:
        ck = json.load(f)
    assert ck["labels"] == 32 and ck["steps"] == 4 and ck["metrics"] == 3 and ck["dir"] == "checkpoints/labels-0000032"
    assert os.listdir(os.path.join(out, "checkpoints")) == ["labels-0000032"]      # older ones removed
    d = os.path.join(out, ck["dir"])
    assert sorted(os.listdir(d)) == ["optimizer.pt", "policy", "rng.pt"]
    assert torch.equal(weights(out)["transformer.wte.weight"], load_file(os.path.join(d, "policy", "model.safetensors"))["transformer.wte.weight"])
    opt = torch.load(os.path.join(d, "optimizer.pt"), weights_only=True)
    assert opt["state"][0]["step"].item() == 4
    assert not [f for f in os.listdir(out) if f.startswith(".") or f.endswith(".tmp")]   # no temporary left behind

def test_keep_checkpoints_keeps_every_one(tiny_world, tmp_path):
    out = str(tmp_path / "run")
    train.main(["--out", out, "--save_every", "8", "--keep_checkpoints"] + MICRO + world_args(tiny_world))
    kept = sorted(os.listdir(os.path.join(out, "checkpoints")))
    assert kept == [f"labels-{n:07d}" for n in (0, 8, 16, 24, 32)]
    assert all(os.path.exists(os.path.join(out, "checkpoints", k, "policy", "model.safetensors")) for k in kept)

def test_resume_refuses_what_it_cannot_continue(tiny_world, capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    bad(["--resume", str(empty)], capsys, "no config.json there")
    started = tmp_path / "started"            # killed before its first checkpoint
    started.mkdir()
    (started / "config.json").write_text("{}")
    bad(["--resume", str(started)], capsys, "no checkpoint yet")
    out = str(tmp_path / "done")
    train.main(["--out", out] + MICRO + world_args(tiny_world))
    bad(["--resume", out], capsys, "has finished")
    os.remove(os.path.join(out, "summary.json"))
    bad(["--resume", out, "--beta", "0.2"], capsys, "--beta 0.2 contradicts its beta=0.1")
    before = open(os.path.join(out, "pairs.jsonl")).read()
    bad(["--resume", out, "--labels", "64"], capsys, "--labels 64 contradicts")
    assert open(os.path.join(out, "pairs.jsonl")).read() == before

def test_from_pairs_trains_on_the_saved_labels_without_the_oracle(tiny_world, monkeypatch, tmp_path):
    """The same pairs in the same order: with the same options the policy ends where the run that
    bought them ended (up to the order of a sum: minibatches are reshuffled), and no label is bought."""
    first, again = str(tmp_path / "first"), str(tmp_path / "again")
    train.main(["--out", first] + MICRO + world_args(tiny_world))
    label = oracle.Oracle.label
    monkeypatch.setattr(oracle.Oracle, "label", lambda *a, **k: pytest.fail("the oracle was asked for a label"))
    train.main(["--out", again, "--from_pairs", os.path.join(first, "pairs.jsonl")] + MICRO + world_args(tiny_world))
    keys = ("prompt_ids", "chosen_ids", "rejected_ids", "chosen_score", "chosen_src")
    p1, p2 = (read_jsonl(os.path.join(d, "pairs.jsonl")) for d in (first, again))
    assert [[p[k] for k in keys] for p in p1] == [[p[k] for k in keys] for p in p2]
    m1, m2 = (read_jsonl(os.path.join(d, "metrics.jsonl")) for d in (first, again))
    for a, b in zip(m1[1:], m2[1:]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["kl"] == pytest.approx(a["kl"], rel=1e-3, abs=1e-4)
    w1, w2 = weights(first), weights(again)
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5
    assert m2[-1]["fwd_per_pair"] == 0                    # nothing was sampled for training
    monkeypatch.setattr(oracle.Oracle, "label", label)
    beta = str(tmp_path / "beta")                          # another beta on the same labels: another policy
    train.main(["--out", beta, "--beta", "1", "--from_pairs", os.path.join(first, "pairs.jsonl")] + MICRO + world_args(tiny_world))
    assert max((w1[k] - weights(beta)[k]).abs().max().item() for k in w1) > 1e-4

def test_from_pairs_refuses_pairs_of_another_vocabulary(tiny_world, capsys, tmp_path):
    first = str(tmp_path / "first")
    train.main(["--out", first] + MICRO + world_args(tiny_world) + ["--labels", "8"])
    pairs = read_jsonl(os.path.join(first, "pairs.jsonl"))
    pairs[3]["chosen_ids"][0] = 10**6
    path = tmp_path / "other.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    bad(["--out", str(tmp_path / "run"), "--from_pairs", str(path), "--labels", "8", "--batch_size", "8"] + world_args(tiny_world),
        capsys, "line 4: token id 1000000 is outside the policy's vocabulary")
    bad(["--out", str(tmp_path / "run"), "--from_pairs", os.path.join(first, "pairs.jsonl")] + MICRO + world_args(tiny_world),
        capsys, "holds 8 pairs, fewer than --labels 32")
    assert not os.path.exists(tmp_path / "run")

def test_a_non_finite_loss_stops_the_run_at_the_last_checkpoint(tiny_world, monkeypatch, capsys, tmp_path):
    dpo_loss = train.dpo_loss
    calls = []
    def nan_at_step_3(*a):
        calls.append(1)
        losses, cr, rr = dpo_loss(*a)
        return (losses * float("nan") if len(calls) == 3 else losses), cr, rr
    monkeypatch.setattr(train, "dpo_loss", nan_at_step_3)
    out = str(tmp_path / "run")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:   # MICRO: 8 pairs a step, evaluations and checkpoints every 16 labels
        train.main(["--out", out, "--save_every", "16"] + MICRO + world_args(tiny_world))
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and "stopped at step 3: the loss is nan" in err, err
    with open(os.path.join(out, "checkpoint.json")) as f:
        assert json.load(f)["labels"] == 16
    assert len(read_jsonl(os.path.join(out, "metrics.jsonl"))) == 2           # step 0 and step 2, nothing after
    assert not os.path.exists(os.path.join(out, "summary.json")) and not os.path.exists(os.path.join(out, "policy"))
    assert len(read_jsonl(os.path.join(out, "pairs.jsonl"))) == 24           # the labels of step 3 are kept

def test_from_pairs_refuses_ids_that_are_not_the_tokenizers(tiny_world, capsys, tmp_path):
    """Ids of another tokenizer of the same size pass the vocabulary range check, not this one: each
    response's ids must decode to its stored text, each prompt's be its tokens."""
    first = str(tmp_path / "first")
    train.main(["--out", first] + MICRO + world_args(tiny_world) + ["--labels", "8"])
    pairs = read_jsonl(os.path.join(first, "pairs.jsonl"))
    ids = pairs[5]["chosen_ids"]
    pairs[5]["chosen_ids"] = [(i + 1) % 50 + 3 for i in ids[:-1]] + ids[-1:]      # valid ids, other words
    path = tmp_path / "other.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    bad(["--out", str(tmp_path / "run"), "--from_pairs", str(path), "--labels", "8", "--batch_size", "8"] + world_args(tiny_world),
        capsys, "line 6: its token ids are not the policy tokenizer's tokens of its texts")

def test_a_from_pairs_run_resumes_only_on_the_source_it_started_with(tiny_world, capsys, tmp_path):
    first, again = str(tmp_path / "first"), str(tmp_path / "again")
    train.main(["--out", first] + MICRO + world_args(tiny_world))
    source = os.path.join(first, "pairs.jsonl")
    train.main(["--out", again, "--from_pairs", source, "--save_every", "16"] + MICRO + world_args(tiny_world))
    os.remove(os.path.join(again, "summary.json"))
    lines_ = open(source).readlines()
    open(source, "w").writelines(lines_[:3] + lines_[4:] + lines_[3:4])         # the same pairs, another order
    bad(["--resume", again], capsys, "the --from_pairs file it trains on")
