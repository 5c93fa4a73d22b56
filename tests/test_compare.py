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
import stats
from conftest import MICRO, read_jsonl, world_args

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
    out = str(tmp_path / "cmp")
    with pytest.raises(SystemExit) as e:
        compare.main(["--samplers", "vanilla", "--seeds", "0", "--out", out, "--"] + SHORT + world_args(tiny_world) +
                     ["--init_from", str(tmp_path / "missing")])
    assert e.value.code == 2 and "every run failed" in capsys.readouterr().err
    assert "has no config.json" in open(os.path.join(out, "vanilla-s0", "train.log")).read()

# ---- fabricated run folders: numbers checked by hand

def fake_run(out, sampler, seed, J, labels=(0, 16, 32), budget=32, **config):
    d = os.path.join(out, f"{sampler}-s{seed}")
    os.makedirs(d)
    cfg = dict(vars(options.get_args(["--overwrite"])), sampler=sampler, seed=seed, mode="online", labels=budget, batch_size=8,
               iterations=4, epochs=2, lr=1e-3, max_new_tokens=10, **config)   # train.py's defaults for the rest
    k = dict(vanilla=1.0, hybrid=0.5, pilaf=1.5, t_pilaf=2.0)[sampler]          # KL grows by k per evaluation
    metrics = [dict(labels=n, J=j, kl=k * i, reward=j + 0.1 * k * i, fwd_per_pair=3.0 if sampler == "pilaf" else 2.0,
                    score_fwd_per_pair=0.0, judged_per_label=2.0) for i, (n, j) in enumerate(zip(labels, J))]
    for name, obj in (("config.json", cfg), ("summary.json", metrics[-1])):
        with open(os.path.join(d, name), "w") as f:
            json.dump(obj, f)
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(m) + "\n" for m in metrics)

def test_statistics_by_hand(tmp_path):
    assert stats.mean_std([0.4, 0.6]) == pytest.approx((0.5, np.sqrt(0.02)))     # sample std, ddof=1
    assert stats.mean_std([0.7]) == (0.7, 0.0)
    # 95% t-intervals: df 2 -> 4.303; df 11 (between the table's 10 and 12) -> 10's 2.228, the wider side
    assert stats.mean_ci([0.0, 1.0, 2.0]) == pytest.approx((1.0, 4.303 / np.sqrt(3)))
    twelve = [0.0, 1.0] * 6
    assert stats.mean_ci(twelve) == pytest.approx((0.5, 2.228 * np.std(twelve, ddof=1) / np.sqrt(12)))
    assert stats.labels_to_reach([0, 16, 32], [0.0, 0.4, 0.8], 0.5) == pytest.approx(20.0)
    assert stats.labels_to_reach([0, 16, 32, 48], [0.0, 0.6, 0.2, 0.9], 0.5) == pytest.approx(16 * 5 / 6)  # first crossing
    assert stats.labels_to_reach([0, 16, 32], [0.0, 0.4, 0.8], -1.0) == 0.0
    assert stats.labels_to_reach([0, 16, 32], [0.0, 0.4, 0.8], 0.81) is None

    out = str(tmp_path / "cmp")
    fake_run(out, "vanilla", 0, [0.0, 0.2, 0.4])
    fake_run(out, "vanilla", 1, [0.0, 0.4, 0.6])   # mean curve 0, 0.3, 0.5: final 0.500 +- 0.141
    fake_run(out, "pilaf", 0, [0.0, 0.5, 0.9])
    fake_run(out, "pilaf", 1, [0.0, 0.3, 0.7])     # mean curve 0, 0.4, 0.8: reaches 0.5 at 16 + 16/4 = 20 labels
    fake_run(out, "hybrid", 0, [0.0, 0.1, 0.2])    # one seed: std 0, never reaches 0.5
    compare.main(["--samplers", "vanilla", "hybrid", "pilaf", "--seeds", "0", "1", "--out", out, "--only_report"])
    text = open(os.path.join(out, "results.md")).read()
    # mean ± 95% t-interval: two seeds 0.4, 0.6 -> sd 0.1414, half-width 12.706 * 0.1414 / sqrt 2 = 1.271
    assert "| Vanilla | 2 | 0.700 ± 1.271 | 2.00 ± 0.00 | 0.500 ± 1.271 | 32 | 2 | 2.00 |" in text, text
    # nothing in bold: no interval lies clear of the others (one seed has none at all)
    assert "| Hybrid | 1 | 0.300 ± nan | 1.00 ± nan | 0.200 ± nan | 32 | 2 | 2.00 |" in text
    assert "| PILAF | 2 | 1.100 ± 1.271 | 3.00 ± 0.00 | 0.800 ± 1.271 | 32 | 2 | 3.00 |" in text
    # labels to reach Vanilla's final J, bootstrap over the 3 distinct resamples of seeds {0,1}:
    # {0,0}: target 0.4, PILAF s0 reaches it at 16 * 0.4/0.5 = 12.8; {1,1}: 0.6, s1 at 16 + 16 * 0.3/0.4 = 28; {0,1}: 20
    assert "- Vanilla: 32 labels [32 – 32]" in text
    assert "- PILAF: 20 labels (interpolated between the evaluations at 16 and 32) [13 – 28]" in text
    assert "- Hybrid: not reached\n" in text          # one seed: no interval
    # paired by seed: PILAF - Vanilla final J = 0.5 and 0.1, mean 0.3, sd 0.283, 95% t (df 1): 12.706 * 0.283 / sqrt 2
    # Hybrid has seed 0 only: J 0.2 - 0.4 = -0.2, reward 0.3 - 0.6 = -0.3, no interval
    # (Δ reward: 0.6 and 0.2, the same spread): half-width 12.706 * 0.2 = 2.541 for both
    assert "| PILAF | 2 | +0.400 ± 2.541 | +1.00 ± 0.00 | +0.300 ± 2.541 |" in text, text
    assert "| Hybrid | 1 | -0.300 ± nan | -1.00 ± nan | -0.200 ± nan |" in text

def test_only_a_separated_interval_is_in_bold(tmp_path):
    """J 0.405 ± 0.064 against 0.905 ± 0.064 (two seeds 0.01 apart: 12.706 * 0.00707 / sqrt 2): PILAF's J
    lies clear of Vanilla's, and Vanilla's KL (2.00 ± 0.00) of PILAF's (3.00); rewards 0.605 against
    1.205, also clear."""
    out = str(tmp_path / "cmp")
    for seed, d in ((0, 0.0), (1, 0.01)):
        fake_run(out, "vanilla", seed, [0.0, 0.2, 0.4 + d])
        fake_run(out, "pilaf", seed, [0.0, 0.5, 0.9 + d])
    compare.main(["--samplers", "vanilla", "pilaf", "--seeds", "0", "1", "--out", out, "--only_report"])
    text = open(os.path.join(out, "results.md")).read()
    assert "| Vanilla | 2 | 0.605 ± 0.064 | **2.00 ± 0.00** | 0.405 ± 0.064 |" in text, text
    assert "| PILAF | 2 | **1.205 ± 0.064** | 3.00 ± 0.00 | **0.905 ± 0.064** |" in text, text

def test_differences_are_paired_by_seed_not_by_position():
    """A sampler whose runs are listed in another order, or that lacks a seed, is still compared seed by seed."""
    run = lambda seed, J: [dict(seed=seed, J=0.0), dict(seed=seed, J=J)]
    runs = {"vanilla": [run(0, 0.1), run(1, 0.5), run(2, 0.2)], "pilaf": [run(2, 0.7), run(1, 0.4)]}
    assert stats.paired(runs, "pilaf", "J") == pytest.approx([0.5, -0.1])

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

def test_vanilla_reaches_its_own_final_j_in_every_resample(tmp_path):
    """The target and the curve are the same mean, computed the same way: with these ten final J
    values (an overfitted-start comparison's) a mean taken another way differs in the last bit in some
    bootstrap resamples, and Vanilla would 'not reach' its own final J."""
    out = str(tmp_path / "cmp")
    finals = [-3.078836940228939, -3.043673542017738, -2.9350552012523017, -2.7966122634708883, -3.2396850881477195,
              -3.2632674396038057, -2.1366119513909023, -3.82263403236866, -2.54009908636411, -3.1981854143242043]
    for seed, j in enumerate(finals):
        fake_run(out, "vanilla", seed, [-7.0, -5.0, j])
    compare.main(["--samplers", "vanilla", "--seeds", "0-9", "--out", out, "--only_report"])
    assert "- Vanilla: 32 labels [32 – 32]" in open(os.path.join(out, "results.md")).read()

def test_a_beta_grid_does_not_name_one_beta(tmp_path):
    """With beta as an axis each point's J uses its own beta: the top table does not print one value."""
    out = str(tmp_path / "cmp")
    for beta in (0.1, 0.2):
        fake_run(os.path.join(out, f"beta-{beta}"), "vanilla", 0, [0.0, 0.2, 0.4], beta=beta)
    compare.main(["--samplers", "vanilla", "--seeds", "0", "--grid", "beta=0.1,0.2", "--out", out, "--only_report"])
    text = open(os.path.join(out, "results.md")).read()
    assert "Final J = reward − β·KL" in text and "| 0.2 | 1 |" in text
    compare.main(["--samplers", "vanilla", "--seeds", "0", "--grid", "beta=0.2", "--out", out, "--only_report"])
    assert "Final J = reward − 0.2·KL" in open(os.path.join(out, "results.md")).read()

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

def test_labels_to_reach_between_evaluations_says_it_is_interpolated(tmp_path, capsys):
    out = str(tmp_path / "cmp")
    fake_run(out, "vanilla", 0, [0.0, 0.5], labels=(0, 32))
    fake_run(out, "pilaf", 0, [0.0, 0.8], labels=(0, 32))
    capsys.readouterr()
    compare.main(["--samplers", "vanilla", "pilaf", "--seeds", "0", "--out", out, "--only_report"])
    text = open(os.path.join(out, "results.md")).read()
    assert "PILAF: 20 labels (interpolated between the evaluations at 0 and 32)" in text
    assert "only 2 evaluations" in text and "two-point lines" in capsys.readouterr().err

def test_a_samplers_own_option_goes_only_to_the_samplers_that_take_it(tmp_path):
    args = compare.points(compare.get_args(["--samplers", "vanilla", "t_pilaf", "--out", str(tmp_path), "--", "--n", "4",
                                            "--labels", "64", "--n=6"]))[0]
    assert compare.train_argv(args, "vanilla", 0)[:4] == ["--labels", "64", "--sampler", "vanilla"]
    assert compare.train_argv(args, "t_pilaf", 0)[:5] == ["--n", "4", "--labels", "64", "--n=6"]

def test_the_report_says_how_far_each_policy_moved(tmp_path):
    out = str(tmp_path / "cmp")
    for seed, r in ((0, 0.2), (1, 0.4)):
        fake_run(out, "vanilla", seed, [0.0, 0.2, 0.4])
        path = os.path.join(out, f"vanilla-s{seed}", "metrics.jsonl")
        rows = [dict(json.loads(line), abs_r=r) for line in open(path)]
        open(path, "w").writelines(json.dumps(m) + "\n" for m in rows)
    compare.main(["--samplers", "vanilla", "--seeds", "0", "1", "--out", out, "--only_report"])
    text = open(os.path.join(out, "results.md")).read()
    assert "## How far each policy moved" in text and "| Vanilla | 2 | 2.00 ± 0.00 | 0.300 ± 1.271 |" in text, text

def test_the_report_pairs_t_pilaf_with_pilaf(tmp_path):
    """What PILAF's roundings cost, seed by seed: J gaps 0.1 and 0.3 -> +0.200 ± 12.706*0.1414/sqrt(2);
    KL grows by 2.0 against 1.5 per evaluation, so +1.00 at the end, and reward = J + 0.1*KL."""
    out = str(tmp_path / "cmp")
    for seed, (jp, jt) in enumerate(((0.4, 0.5), (0.6, 0.9))):
        fake_run(out, "pilaf", seed, [0.0, 0.2, jp])
        fake_run(out, "t_pilaf", seed, [0.0, 0.2, jt])
    compare.main(["--samplers", "pilaf", "t_pilaf", "--seeds", "0", "1", "--out", out, "--only_report"])
    text = open(os.path.join(out, "results.md")).read()
    assert "## What PILAF's two roundings cost" in text
    assert "| 2 | +0.300 ± 1.271 | +1.00 ± 0.00 | +0.200 ± 1.271 |" in text, text
