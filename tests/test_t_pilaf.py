"""T-PILAF, the theory's sampler by sampling-importance-resampling: on responses that can all be
enumerated, its draws approach the exact pi*e^{+-r}/Z+- and its tilted share Z+Z-/(1+Z+Z-) as N grows."""
import pytest
import torch
import torch.nn.functional as F

from pilaf import resample
from conftest import H_POL, H_REF, MICRO, bad, one_token_pairs, read_jsonl, world_args

def exact(h_pol, h_ref, beta):
    """pi, pi+, pi- over one-token responses, and the tilted share Z+Z-/(1+Z+Z-)."""
    lp, lr = F.log_softmax(torch.tensor(h_pol, dtype=torch.float64), -1), F.log_softmax(torch.tensor(h_ref, dtype=torch.float64), -1)
    pi, r = lp.exp(), beta * (lp - lr)
    zp, zm = (pi * r.exp()).sum(), (pi * (-r).exp()).sum()
    return pi, pi * r.exp() / zp, pi * (-r).exp() / zm, (zp * zm / (1 + zp * zm)).item(), r

def tv(idx, p):
    return 0.5 * (torch.bincount(idx, minlength=len(p)).double() / len(idx) - p).abs().sum().item()

def test_resampled_draws_approach_the_tilted_distributions():
    """Candidates drawn from the exact pi; the resampled y+ and y- approach pi+ and pi-. Self-normalised
    resampling from N/2 candidates is biased by O(1/N): the tilt falls short at small N (at N = 4, two
    candidates per half, about 0.1 of a tilt of 0.23 is missing); the stated bound at N = 128 is 0.02, which with 40000
    draws leaves about 3x the sampling noise (0.4 * sqrt(5 / 40000) = 0.005) as margin. The plain pairs
    are exactly (pi, pi) at every N: Z+- come from the other candidates, so the branch taken says nothing
    about the plain pair's own (their TV to pi is the sampling noise, under 0.015 with 4 standard errors)."""
    beta, B = 1.0, 40000
    pi, pi_plus, pi_minus, w1, r = exact(H_POL, H_REF, beta)
    g = torch.Generator().manual_seed(0)
    gaps = {}
    for n in (4, 8, 32, 128):
        cand = torch.multinomial(pi, B * n, replacement=True, generator=g).view(B, n)       # (B, n) candidates ~ pi
        got = resample(r[cand], g)
        pick = lambda idx: cand.gather(1, idx[:, None])[:, 0]
        plain = ~got["tilted"]
        gaps[n] = (tv(pick(got["plus"]), pi_plus), tv(pick(got["minus"]), pi_minus), got["tilted"].double().mean().item(),
                   tv(pick(got["a"])[plain], pi), tv(pick(got["b"])[plain], pi))
    tilt = 0.5 * (pi - pi_plus).abs().sum().item()
    assert tilt > 0.2 and gaps[4][0] > 0.3 * tilt                          # two candidates per half: a large part missing
    for k in (0, 1):
        assert gaps[4][k] > gaps[8][k] > gaps[32][k] and gaps[128][k] < 0.02, gaps
    assert all(g[3] < 0.015 and g[4] < 0.015 for g in gaps.values()), gaps
    # the tilted share: Z+- estimated from N - 2 candidates; at N = 128 within 4 standard errors and 0.01 of bias
    assert abs(gaps[128][2] - w1) < 4 * (w1 * (1 - w1) / B) ** 0.5 + 0.01, (gaps[128][2], w1)

def test_t_pilaf_end_to_end_on_one_token_responses():
    """The sampler itself (decode, implicit rewards through both models, resampling) on 8000 prompts
    whose responses are one token: its tilted pairs approach pi+ and pi-, its plain pairs pi, its tilted
    share Z+Z-/(1+Z+Z-) as N grows; it logs Best-of-N's cost and each pair's Z+- and branch. pi- is the
    hard one here (TV(pi, pi-) = 0.55: the weights pi_ref/pi are large where pi is small), so its bound
    at N = 64 is the loosest, 0.05."""
    beta = 1.0
    pi, pi_plus, pi_minus, w1, r = exact(H_POL, H_REF, beta)
    gaps = {}
    for n in (4, 16, 64):
        out = one_token_pairs("t_pilaf", H_POL, H_REF, beta, n=n)
        B = len(out["src"])
        tilted = torch.tensor([x["branch"] == "tilted" for x in out["extra"]])
        assert [s for s, t in zip(out["src"], tilted) if t] == [("T+", "T-")] * int(tilted.sum())
        assert out["forwards"] == n * B and out["score_forwards"] == 2 * n * B
        a, b = out["a"][:, 0], out["b"][:, 0]
        gaps[n] = (tv(a[tilted], pi_plus), tv(b[tilted], pi_minus), tv(a[~tilted], pi), tilted.double().mean().item())
    assert gaps[4][0] > gaps[16][0] > gaps[64][0] and gaps[64][0] < 0.02, gaps
    assert gaps[4][1] > gaps[16][1] > gaps[64][1] and gaps[64][1] < 0.05, gaps
    assert gaps[64][2] < 0.03, gaps
    assert abs(gaps[64][3] - w1) < 4 * (w1 * (1 - w1) / B) ** 0.5 + 0.01, (gaps[64][3], w1)
    zp = torch.tensor([x["z_plus"] for x in out["extra"]])             # Z+ = E_pi[e^r], estimated per prompt
    assert abs(zp.mean().item() - (pi * r.exp()).sum().item()) < 0.02

def test_the_two_responses_are_different_candidates():
    g = torch.Generator().manual_seed(1)
    r = torch.zeros(500, 4, dtype=torch.float64)                     # policy == reference: every weight equal
    got = resample(r, g)
    assert (got["a"] < 2).all() and (got["b"] >= 2).all()            # a from the first half, b from the second
    assert abs(got["tilted"].double().mean().item() - 0.5) < 4 * (0.25 / 500) ** 0.5   # Z+ = Z- = 1: a fair coin

def test_t_pilaf_runs_end_to_end_and_records_its_branch(tiny_world, tmp_path):
    import os
    import train
    out = str(tmp_path / "run")
    last = train.main(["--sampler", "t_pilaf", "--n", "4", "--out", out] + MICRO + world_args(tiny_world))
    pairs = read_jsonl(os.path.join(out, "pairs.jsonl"))
    assert len(pairs) == 32 and last["fwd_per_pair"] == 4 and last["score_fwd_per_pair"] == 8
    assert {p["extra"]["branch"] for p in pairs} <= {"tilted", "plain"} and all(p["extra"]["z_plus"] > 0 for p in pairs)
    assert all({p["chosen_src"], p["rejected_src"]} in ({"T+", "T-"}, {"pi"}) for p in pairs)
    assert all((p["extra"]["branch"] == "tilted") == (p["chosen_src"] != "pi") for p in pairs)

@pytest.mark.parametrize("argv,match", [
    (["--sampler", "t_pilaf", "--n", "1"], "--n must be at least 2"),
    (["--sampler", "t_pilaf", "--n", "5"], "--n must be even and at least 4 for t_pilaf"),
    (["--sampler", "t_pilaf", "--n", "2"], "--n must be even and at least 4 for t_pilaf"),
    (["--sampler", "t_pilaf", "--temperature", "0.7"], "t_pilaf's candidates must be samples of the policy itself"),
    (["--sampler", "pilaf", "--prompt_weight"], "--prompt_weight is an option of --sampler t_pilaf"),
    (["--sampler", "pilaf", "--n", "4"], "--n is an option of --sampler best_of_n and t_pilaf, which --sampler pilaf cannot use"),
])
def test_t_pilaf_bad_input_fails_in_one_line(argv, match, capsys, tmp_path):
    bad(argv + ["--out", str(tmp_path / "run"), "--world", str(tmp_path / "world")], capsys, match)
