"""The statistics and the report, checked by hand on fabricated run folders (conftest.fake_run): intervals,
paired differences by seed, labels-to-reach, what the report says and puts in bold."""
import json
import os

import numpy as np
import pytest

import compare
import stats
from conftest import fake_run

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

def test_labels_to_reach_between_evaluations_says_it_is_interpolated(tmp_path, capsys):
    out = str(tmp_path / "cmp")
    fake_run(out, "vanilla", 0, [0.0, 0.5], labels=(0, 32))
    fake_run(out, "pilaf", 0, [0.0, 0.8], labels=(0, 32))
    capsys.readouterr()
    compare.main(["--samplers", "vanilla", "pilaf", "--seeds", "0", "--out", out, "--only_report"])
    text = open(os.path.join(out, "results.md")).read()
    assert "PILAF: 20 labels (interpolated between the evaluations at 0 and 32)" in text
    assert "only 2 evaluations" in text and "two-point lines" in capsys.readouterr().err

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
    """T-PILAF against PILAF, seed by seed: J gaps 0.1 and 0.3 -> +0.200 ± 12.706*0.1414/sqrt(2);
    KL grows by 2.0 against 1.5 per evaluation, so +1.00 at the end, and reward = J + 0.1*KL."""
    out = str(tmp_path / "cmp")
    for seed, (jp, jt) in enumerate(((0.4, 0.5), (0.6, 0.9))):
        fake_run(out, "pilaf", seed, [0.0, 0.2, jp])
        fake_run(out, "t_pilaf", seed, [0.0, 0.2, jt])
    compare.main(["--samplers", "pilaf", "t_pilaf", "--seeds", "0", "1", "--out", out, "--only_report"])
    text = open(os.path.join(out, "results.md")).read()
    assert "## T-PILAF − PILAF, paired by seed" in text
    assert "| 2 | +0.300 ± 1.271 | +1.00 ± 0.00 | +0.200 ± 1.271 |" in text, text
