"""compare.py: a micro comparison on the tiny world (resumable, contained), its one-line errors, and
its statistics checked by hand on fabricated run folders."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import compare
import options
from conftest import MICRO, fake_run, read_jsonl, world_args

SHORT = MICRO + ["--labels", "16", "--eval_every", "8"]      # half the micro budget: two steps per run

@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    # each train.py subprocess on one thread: two processes with two threads each on a 2-core
    # machine slow the tiny models down by an order of magnitude
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

def mtimes(out):
    return {d: os.path.getmtime(os.path.join(out, d, "summary.json")) for d in sorted(os.listdir(out))
            if os.path.exists(os.path.join(out, d, "summary.json"))}

def test_micro_comparison_resumes_and_reports(tiny_world, tmp_path, capsys):
    out = str(tmp_path / "cmp")
    argv = ["--samplers", "vanilla", "pilaf", "--seeds", "0", "1", "--out", out, "--"] + SHORT + world_args(tiny_world)
    compare.main(argv)
    text = open(os.path.join(out, "results.md")).read()
    assert "| Vanilla | 2 |" in text and "| PILAF | 2 |" in text and "labels needed to reach Vanilla" in text
    assert text.split("\n", 2)[2] in capsys.readouterr().out          # printed too
    for png in ("reward_kl.png", "j_labels.png"):
        assert os.path.getsize(os.path.join(out, png)) > 1000
    before = mtimes(out)
    assert sorted(before) == ["pilaf-s0", "pilaf-s1", "vanilla-s0", "vanilla-s1"]
    with open(os.path.join(out, "vanilla-s0", "config.json")) as f:
        assert json.load(f)["labels"] == 16
    # an interrupted run (no summary.json) continues from its checkpoint, its labels reused; one killed
    # before its first checkpoint is moved aside (labels kept) and run again; finished ones are not touched
    os.remove(os.path.join(out, "pilaf-s1", "summary.json"))
    pairs = open(os.path.join(out, "pilaf-s1", "pairs.jsonl")).read()
    os.remove(os.path.join(out, "vanilla-s1", "summary.json"))
    os.remove(os.path.join(out, "vanilla-s1", "checkpoint.json"))
    compare.main(argv)
    after = mtimes(out)
    assert sorted(after) == sorted(before)
    assert all(after[d] == before[d] for d in before if d not in ("pilaf-s1", "vanilla-s1"))
    assert open(os.path.join(out, "pilaf-s1", "pairs.jsonl")).read() == pairs
    assert not os.path.exists(os.path.join(out, "pilaf-s1.interrupted-1"))
    assert "resuming" in open(os.path.join(out, "pilaf-s1", "train.log")).read()
    assert os.path.getsize(os.path.join(out, "vanilla-s1.interrupted-1", "pairs.jsonl")) > 0   # its labels kept
    # --only_report reads the folders and trains nothing
    compare.main(["--samplers", "vanilla", "pilaf", "--seeds", "0", "1", "--out", out, "--only_report"])
    assert mtimes(out) == after

def test_a_failing_run_is_contained(tiny_world, tmp_path, capsys):
    """A run that fails only once it starts (here a model folder whose config.json is not JSON: compare's own
    checks see a folder with a config.json) is reported, with its log kept, and the sweep exits 2."""
    out, broken = str(tmp_path / "cmp"), tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("not json")
    with pytest.raises(SystemExit) as e:
        compare.main(["--samplers", "vanilla", "--seeds", "0", "--out", out, "--"] + SHORT + world_args(tiny_world) +
                     ["--init_from", str(broken)])
    assert e.value.code == 2 and "every run failed" in capsys.readouterr().err
    assert "is not a valid JSON file" in open(os.path.join(out, "vanilla-s0", "train.log")).read()

def test_a_missing_model_folder_is_refused_before_any_run(tiny_world, tmp_path, capsys):
    out = str(tmp_path / "cmp")
    with pytest.raises(SystemExit) as e:
        compare.main(["--samplers", "vanilla", "--seeds", "0", "--out", out, "--"] + SHORT + world_args(tiny_world) +
                     ["--init_from", str(tmp_path / "missing")])
    assert e.value.code == 2 and "missing' does not exist" in capsys.readouterr().err
    assert not os.path.exists(out)

# ---- fabricated run folders: numbers checked by hand

def test_seeds_take_ranges(capsys):
    assert compare.get_args(["--seeds", "0-3", "7", "2"]).seeds == [0, 1, 2, 3, 7]
    for bad in ("0-x", "3-1", "-2", "a", "0-"):
        with pytest.raises(SystemExit) as e:
            compare.get_args(["--seeds", bad])
        assert e.value.code == 2 and "is neither a seed nor a range like 0-9" in capsys.readouterr().err

def test_a_run_older_than_an_option_ran_with_its_default(tmp_path):
    """Runs finished before --loss or --reference existed have no such key in config.json: they ran
    with the default and still belong in a comparison that uses it."""
    out = str(tmp_path / "cmp")
    fake_run(out, "vanilla", 0, [0.0, 0.2, 0.4])
    cfg_path = os.path.join(out, "vanilla-s0", "config.json")
    cfg = json.load(open(cfg_path))
    for k in ("loss", "reference", "oracle_format", "from_pairs"):
        cfg.pop(k)
    json.dump(cfg, open(cfg_path, "w"))
    fake_run(out, "pilaf", 0, [0.0, 0.3, 0.5])
    compare.main(["--samplers", "vanilla", "pilaf", "--seeds", "0", "--out", out, "--only_report"])
    fake_run(out, "hybrid", 0, [0.0, 0.3, 0.5], loss="ipo")
    with pytest.raises(SystemExit):
        compare.main(["--samplers", "vanilla", "hybrid", "--seeds", "0", "--out", out, "--only_report"])

def test_bad_input_fails_in_one_line(tmp_path, capsys):
    out = str(tmp_path / "cmp")
    fake_run(out, "vanilla", 0, [0.0, 0.2, 0.4], budget=32)
    fake_run(out, "vanilla", 1, [0.0, 0.2, 0.4], budget=64)

    def bad(argv, match):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            compare.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and match in err, err

    bad(["--samplers", "vanilla", "--seeds", "0", "--out", out, "--", "--labels", "64"], "mismatched budgets")
    bad(["--samplers", "vanilla", "--seeds", "0", "1", "--out", out, "--only_report"], "mismatched budgets")
    # online runs take no iterations and one pass: a different --epochs is no mismatch there ...
    compare.main(["--samplers", "vanilla", "--seeds", "0", "--out", out, "--", "--labels", "32", "--batch_size", "8",
                  "--lr", "1e-3", "--max_new_tokens", "10", "--epochs", "5"])
    # ... but it is in iterative mode
    bad(["--samplers", "vanilla", "--seeds", "0", "--out", out, "--mode", "iterative", "--", "--labels", "32",
         "--batch_size", "8", "--lr", "1e-3", "--max_new_tokens", "10", "--epochs", "5"], "epochs=2")
    # the learning rate is part of the budget: a comparison at another lr does not take these runs
    bad(["--samplers", "vanilla", "--seeds", "0", "--out", out, "--", "--labels", "32", "--batch_size", "8",
         "--lr", "3e-4", "--max_new_tokens", "10"], "lr=0.001")
    bad(["--samplers", "vanilla", "nope", "--out", out], "invalid choice: 'nope'")
    bad(["--out", out, "--", "--seed", "3"], "set by compare.py")
    bad(["--out", str(tmp_path / "empty"), "--only_report"], "no finished runs")
    assert not os.path.exists(os.path.join(out, "vanilla-s2"))

def test_runs_with_other_models_are_refused(tmp_path, capsys):
    """A finished run made with another oracle (or policy, or prompts) is not mixed into the table."""
    out = str(tmp_path / "cmp")
    same = ["--labels", "32", "--batch_size", "8", "--lr", "1e-3", "--max_new_tokens", "10"]
    fake_run(out, "vanilla", 0, [0.0, 0.2, 0.4])          # the embedded world's models, as train.py records them:
    with open(os.path.join(out, "vanilla-s0", "config.json")) as f:   # resolved folders, not None
        cfg = json.load(f)
    cfg.update({k: os.path.join(cfg["world"], k) for k in ("policy", "oracle", "prompts")})
    with open(os.path.join(out, "vanilla-s0", "config.json"), "w") as f:
        json.dump(cfg, f)
    fake_run(out, "vanilla", 1, [0.0, 0.2, 0.4], oracle=str(tmp_path / "another-oracle"))
    compare.main(["--samplers", "vanilla", "--seeds", "0", "--out", out, "--"] + same)   # same world: accepted
    for argv in (["--samplers", "vanilla", "--seeds", "0", "1", "--out", out, "--"] + same,
                 ["--samplers", "vanilla", "--seeds", "0", "1", "--out", out, "--only_report"]):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            compare.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1, err
        assert "mismatched budgets" in err and "another-oracle" in err and "vanilla-s1" in err, err

def test_grid_axes_by_hand(tmp_path, capsys):
    """--grid: one folder per point, each with its own report; the top results.md has a row per point."""
    out = str(tmp_path / "cmp")
    for loss, shift in (("dpo", 0.0), ("ipo", -0.2)):
        d = os.path.join(out, f"loss-{loss}")
        fake_run(d, "vanilla", 0, [0.0, 0.2, 0.4 + shift], loss=loss)
        fake_run(d, "vanilla", 1, [0.0, 0.4, 0.6 + shift], loss=loss)
        fake_run(d, "pilaf", 0, [0.0, 0.5, 0.9], loss=loss)
        fake_run(d, "pilaf", 1, [0.0, 0.3, 0.7], loss=loss)
    compare.main(["--samplers", "vanilla", "pilaf", "--seeds", "0-1", "--grid", "loss=dpo,ipo", "--out", out, "--only_report"])
    text = open(os.path.join(out, "results.md")).read()
    assert "| loss | seeds | Vanilla J | PILAF J | PILAF − Vanilla Δ J |" in text
    # paired differences 0.5, 0.1 (dpo) and 0.7, 0.3 (ipo): sd 0.283, half-width 12.706 * 0.2 = 2.541
    assert "| dpo | 2 | 0.500 ± 1.271 | 0.800 ± 1.271 | +0.300 ± 2.541 |" in text, text
    assert "| ipo | 2 | 0.300 ± 1.271 | 0.800 ± 1.271 | +0.500 ± 2.541 |" in text, text
    for loss in ("dpo", "ipo"):
        assert "| PILAF | 2 |" in open(os.path.join(out, f"loss-{loss}", "results.md")).read()
        assert os.path.getsize(os.path.join(out, f"loss-{loss}", "reward_kl.png")) > 1000
    # a point whose finished runs disagree with its axis value is refused like any mismatched budget
    with pytest.raises(SystemExit):
        compare.main(["--samplers", "vanilla", "--seeds", "0", "--grid", "loss=ipo,dpo", "--out", out, "--", "--labels", "32",
                      "--batch_size", "8", "--lr", "1e-3", "--max_new_tokens", "10", "--beta", "0.2"])

def test_grid_runs_end_to_end(tiny_world, tmp_path):
    """A real grid on the tiny world: each point's runs get its value (the first step's loss is DPO's
    log 2 or the hinge's 1 at the reference) and the top table has both points."""
    out = str(tmp_path / "cmp")
    compare.main(["--samplers", "vanilla", "pilaf", "--seeds", "0", "--grid", "loss=dpo,hinge", "--out", out, "--"]
                 + SHORT + world_args(tiny_world))
    for loss, first in (("dpo", np.log(2)), ("hinge", 1.0)):
        for s in ("vanilla", "pilaf"):
            m = read_jsonl(os.path.join(out, f"loss-{loss}", f"{s}-s0", "metrics.jsonl"))
            assert m[1]["loss"] == pytest.approx(first, abs=1e-5), (loss, s)
    text = open(os.path.join(out, "results.md")).read()
    assert "| dpo | 1 |" in text and "| hinge | 1 |" in text

def test_bad_grid_fails_in_one_line(tmp_path, capsys):
    def bad(argv, match):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            compare.main(["--out", str(tmp_path / "cmp")] + argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and match in err, err
    bad(["--grid", "nope=1,2"], "train.py has no option --nope")
    bad(["--grid", "seed=1,2"], "use compare.py's --seeds")
    bad(["--grid", "mode=online,iterative"], "compare.py sets --mode itself")
    bad(["--grid", "loss"], "is not KEY=V1,V2")
    bad(["--grid", "loss=dpo,,ipo"], "is not KEY=V1,V2")
    bad(["--grid", "loss=dpo", "loss=ipo"], "given twice")
    bad(["--grid", "loss=dpo,ipo", "--", "--loss", "ipo"], "both a --grid axis and fixed after --")
    bad(["--grid", "loss=dpo,bogus"], "invalid choice: 'bogus'")        # train.py's own check, before any run
    assert not os.path.exists(tmp_path / "cmp")

def test_a_new_train_option_is_counted_in_the_fairness_check(tmp_path, monkeypatch, capsys):
    """compare.py takes its budget keys from train.py's parser: an option added there is compared
    between finished runs without being listed anywhere else."""
    parser = options.parser
    def with_knob():
        p = parser()
        p.add_argument("--knob", type=float, default=1.0, help="a fork's new option")
        return p
    monkeypatch.setattr(options, "parser", with_knob)
    assert "knob" in compare.budget_keys() and "out" not in compare.budget_keys()
    out = str(tmp_path / "cmp")
    fake_run(out, "vanilla", 0, [0.0, 0.2, 0.4])
    fake_run(out, "vanilla", 1, [0.0, 0.2, 0.4], knob=2.0)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        compare.main(["--samplers", "vanilla", "--seeds", "0", "1", "--out", out, "--only_report"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "mismatched budgets" in err and "knob=2.0" in err, err


# ---- sweeps past one process: --jobs, --commands

def test_jobs_2_gives_the_results_of_jobs_1_and_a_failing_run_is_named(tiny_world, tmp_path, capsys):
    """Two runs at a time, each on one thread: the same report as one at a time (the runs are
    independent processes); a run that fails is named with its log's last line and the others finish."""
    reports = []
    for jobs in ("1", "2"):
        out = str(tmp_path / f"jobs{jobs}")
        compare.main(["--samplers", "vanilla", "pilaf", "--seeds", "0", "1", "--jobs", jobs, "--out", out, "--"]
                     + SHORT + world_args(tiny_world))
        reports.append(open(os.path.join(out, "results.md")).read().split("\n", 1)[1])   # the title names the folder
        assert "\r" not in open(os.path.join(out, "pilaf-s0", "train.log")).read()      # no progress-bar redraws
    assert reports[0] == reports[1]
    out = str(tmp_path / "failing")               # a run whose folder was damaged: it fails, the other finishes
    d = os.path.join(out, "vanilla-s0")
    os.makedirs(d)
    cfg = vars(options.get_args(SHORT + world_args(tiny_world) + ["--sampler", "vanilla", "--seed", "0", "--out", d]))
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    open(os.path.join(d, "checkpoint.json"), "w").write("{ no")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        compare.main(["--samplers", "vanilla", "pilaf", "--seeds", "0", "--jobs", "2", "--out", out, "--"] + SHORT
                     + world_args(tiny_world))
    captured = capsys.readouterr()
    assert e.value.code == 1 and os.path.exists(os.path.join(out, "pilaf-s0", "summary.json"))
    assert "vanilla-s0 failed (exit 2): train.py: error:" in captured.err + captured.out
    assert "checkpoint.json is damaged" in captured.err + captured.out
    assert "1 run(s) failed: vanilla-s0" in captured.err

def test_commands_prints_exactly_the_missing_runs(tiny_world, tmp_path, capsys):
    out = str(tmp_path / "cmp")
    argv = ["--samplers", "vanilla", "pilaf", "--seeds", "0", "1", "--out", out, "--"] + SHORT + world_args(tiny_world)
    compare.main(["--samplers", "vanilla", "--seeds", "0", "--out", out, "--"] + SHORT + world_args(tiny_world))
    os.remove(os.path.join(out, "vanilla-s0", "summary.json"))          # an unfinished run: it continues
    capsys.readouterr()
    compare.main(["--commands"] + argv)
    cmds = capsys.readouterr().out.strip().splitlines()
    assert len(cmds) == 4 and all(c.startswith(f"cd {compare.HERE} && {sys.executable} train.py ") for c in cmds), cmds
    assert cmds[0].endswith(f"--resume {os.path.abspath(os.path.join(out, 'vanilla-s0'))}")
    assert [c.split("--out ")[1] for c in cmds[1:]] == [os.path.abspath(os.path.join(out, n))
                                                        for n in ("pilaf-s0", "vanilla-s1", "pilaf-s1")]
    for c in cmds:                                   # what a cluster's scheduler would do with them
        assert subprocess.run(c, shell=True, env=dict(os.environ, TQDM_DISABLE="1"), capture_output=True).returncode == 0
    compare.main(["--commands"] + argv)
    assert capsys.readouterr().out == ""
    compare.main(argv)                                # the finished runs are reported, not run again
    assert "| PILAF | 2 |" in open(os.path.join(out, "results.md")).read()

@pytest.mark.parametrize("argv,match", [
    (["--jobs", "0"], "--jobs must be at least 1"),
    (["--jobs", "-2"], "--jobs must be at least 1"),
    (["--jobs", "2", "--commands"], "leave out --jobs"),
])
def test_sweep_options_fail_in_one_line(argv, match, tmp_path, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        compare.main(argv + ["--out", str(tmp_path / "cmp")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and match in err, err

def test_an_unfinished_run_of_another_budget_is_refused(tmp_path, capsys):
    """An interrupted --labels 128 run in the folder of a --labels 256 comparison would be continued with
    its own budget and reported beside the others: refused before anything runs."""
    out = str(tmp_path / "cmp")
    fake_run(out, "vanilla", 0, [0.0, 0.2, 0.4], budget=32)
    os.remove(os.path.join(out, "vanilla-s0", "summary.json"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        compare.main(["--samplers", "vanilla", "--seeds", "0", "--out", out, "--", "--labels", "64"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "started (unfinished) with labels=32" in err, err
    assert not os.path.exists(os.path.join(out, "vanilla-s0", "train.log"))       # nothing ran

def test_commands_for_a_folder_of_another_budget_is_refused(tmp_path, capsys):
    out = str(tmp_path / "cmp")
    fake_run(out, "vanilla", 0, [0.0, 0.2, 0.4], budget=32)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        compare.main(["--commands", "--samplers", "vanilla", "--seeds", "0", "--out", out, "--", "--labels", "64"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "mismatched budgets" in err, err

def test_a_samplers_own_option_goes_only_to_the_samplers_that_take_it(tmp_path):
    args = compare.points(compare.get_args(["--samplers", "vanilla", "t_pilaf", "--out", str(tmp_path), "--", "--n", "4",
                                            "--labels", "64", "--n=6"]))[0]
    assert compare.train_argv(args, "vanilla", 0)[:4] == ["--labels", "64", "--sampler", "vanilla"]
    assert compare.train_argv(args, "t_pilaf", 0)[:5] == ["--n", "4", "--labels", "64", "--n=6"]

