"""Sturdy where it matters: no foreign code on any load."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from test_train import MICRO, world_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def run_train(argv, stdin="", cwd=ROOT):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py")] + argv, input=stdin, env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)

def ask_for_code(folder, in_file):
    """Make a saved model folder ask for code of its own: `auto_map` in `in_file` naming two modules
    of the folder, each of which, if run, writes a marker file. -> the markers' paths"""
    with open(os.path.join(folder, in_file)) as f:
        cfg = json.load(f)
    key = "AutoConfig" if in_file == "config.json" else "AutoTokenizer"
    cfg["auto_map"] = {key: "evil_a.Thing", "AutoModelForCausalLM": "evil_b.Thing",
                       "AutoModelForSequenceClassification": "evil_b.Thing"}
    with open(os.path.join(folder, in_file), "w") as f:
        json.dump(cfg, f)
    markers = []
    for mod in ("evil_a", "evil_b"):
        marker = os.path.join(folder, f"RAN_{mod}")
        with open(os.path.join(folder, mod + ".py"), "w") as f:
            f.write(f"open({marker!r}, 'w').write('foreign code ran')\nThing = None\n")
        markers.append(marker)
    return markers

@pytest.mark.parametrize("in_file", ["config.json", "tokenizer_config.json"])
def test_a_folder_that_asks_for_its_own_code_is_refused_by_every_path(in_file, tiny_world, tmp_path):
    """Policy, oracle, judge, --init_from and a checkpoint read by --resume: each refused in one line,
    exit 2, with stdin answering '1' to any question (the person-labeller's key), and no code run."""
    evil_policy, evil_rm = str(tmp_path / "evil_policy"), str(tmp_path / "evil_rm")
    shutil.copytree(os.path.join(tiny_world, "policy"), evil_policy)
    shutil.copytree(os.path.join(tiny_world, "oracle"), evil_rm)
    markers = ask_for_code(evil_policy, in_file) + ask_for_code(evil_rm, in_file)
    w = world_args(tiny_world)
    paths = {"--policy": ["--policy", evil_policy] + w[2:],
             "--init_from": w + ["--init_from", evil_policy],
             "--oracle": w[:2] + ["--oracle", evil_rm] + w[4:],
             "--judge": ["--oracle", "human", "--judge", evil_rm] + w[:2] + w[4:],
             "--oracle human --policy": ["--oracle", "human", "--judge", os.path.join(tiny_world, "oracle"),
                                         "--policy", evil_policy] + w[4:]}
    # a run whose last checkpoint's policy folder asks for code: --resume reads it
    run = str(tmp_path / "run")
    p = run_train(["--out", run, "--save_every", "16"] + MICRO + w)
    assert p.returncode == 0, p.stderr[-2000:]
    os.remove(os.path.join(run, "summary.json"))
    with open(os.path.join(run, "checkpoint.json")) as f:
        ck_policy = os.path.join(run, json.load(f)["dir"], "policy")
    markers += ask_for_code(ck_policy, in_file)
    paths["--resume"] = ["--resume", run]
    for name, argv in paths.items():
        out = [] if name == "--resume" else ["--out", str(tmp_path / f"out{len(name)}")] + MICRO
        p = run_train(argv + out, stdin="1\n1\n1\n")
        assert p.returncode == 2, (name, p.stdout[-1000:], p.stderr[-2000:])
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and "asks to run code of its own" in lines[0], (name, p.stderr[-2000:])
        assert not [m for m in markers if os.path.exists(m)], f"{name}: foreign code ran"
