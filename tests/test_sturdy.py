"""Sturdy where it matters: no foreign code on any load, one writer per run folder, signals, damaged
folders, a full disk, a folder removed under a stopped run, a policy that blows up (bad input and
folders that are not runs: test_refusals.py)."""
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import pairs
import train
from conftest import MICRO, TIMINGS, bad, lines, read_jsonl, weights, world_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TQDM_DISABLE="1")

def run_train(argv, stdin="", cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py")] + argv, input=stdin, env=ENV, cwd=cwd,
                          capture_output=True, text=True, timeout=600)

def start_train(argv):
    """train.py in the background, its output streams kept apart."""
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py")] + argv, env=ENV, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)

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


# ---- one writer per run folder

def one_line_error(p):
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1 and err[0].startswith("train.py: error:"), (p.returncode, p.stderr[-2000:])
    return err[0]

def test_two_fresh_runs_started_together_on_one_folder(tiny_world, tmp_path):
    """Exactly one runs; the other exits 2 at once, naming the process that holds the folder, and the
    folder ends with the winner's config, pairs and summary, nothing of the loser's."""
    out = str(tmp_path / "run")
    procs = [start_train(["--seed", str(s), "--out", out] + MICRO + world_args(tiny_world)) for s in (0, 1)]
    done = [(p.communicate(timeout=600)[1], p.returncode) for p in procs]
    assert sorted(rc for _, rc in done) == [0, 2], [(rc, err[-1500:]) for err, rc in done]
    winner = [s for s, (_, rc) in zip((0, 1), done) if rc == 0][0]
    loser = [err for err, rc in done if rc == 2][0].strip().splitlines()
    assert len(loser) == 1 and "is being written by process" in loser[0], loser
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["seed"] == winner and len(read_jsonl(os.path.join(out, "pairs.jsonl"))) == 32
    assert json.load(open(os.path.join(out, "summary.json")))["labels"] == 32

def test_resume_or_overwrite_during_a_run_is_refused(tiny_world, tmp_path):
    """--resume (and --overwrite) on a folder a run is writing: refused within seconds, one line naming
    the running process; the run ends with exactly its budget, no label bought twice. The run is a
    person's session, so that it waits for its answers while the others try."""
    out = str(tmp_path / "run")
    w = world_args(tiny_world)
    argv = ["--oracle", "human", "--judge", w[3], "--policy", w[1], "--prompts", w[5], "--labels", "16",
            "--batch_size", "8", "--eval_prompts", "4", "--eval_samples", "1", "--max_new_tokens", "10", "--out", out]
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py")] + argv, env=ENV, cwd=ROOT, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first.stdin.write("1\n2\n1\n2\n")
    first.stdin.flush()
    while lines(os.path.join(out, "pairs.jsonl")) < 4 and first.poll() is None:
        time.sleep(0.01)
    for again in (["--resume", out], argv + ["--overwrite"]):
        t = time.time()
        err = one_line_error(run_train(again))
        assert f"is being written by process {first.pid}" in err and time.time() - t < 60, err
    _, err = first.communicate("1\n2\n" * 6, timeout=600)
    assert first.returncode == 0, err[-2000:]
    assert len(read_jsonl(os.path.join(out, "pairs.jsonl"))) == 16
    assert json.load(open(os.path.join(out, "summary.json")))["answered"] == 16

# ---- stopping: Ctrl-C and SIGTERM, like a kill, in one line

STOP_ARGV = ["--sampler", "pilaf", "--labels", "192", "--batch_size", "16", "--save_every", "64", "--eval_every", "64",
             "--eval_prompts", "8", "--eval_samples", "2", "--max_new_tokens", "12"]

def stopped_run(tiny_world, out, sig):
    """A run stopped by `sig` once it holds pairs past its checkpoint at 64 labels. -> (exit code, stderr)"""
    p = start_train(STOP_ARGV + world_args(tiny_world) + ["--out", out])
    while lines(os.path.join(out, "pairs.jsonl")) < 96 and p.poll() is None:
        time.sleep(0.002)
    p.send_signal(sig)
    _, err = p.communicate(timeout=600)
    return p.returncode, err

@pytest.fixture(scope="module")
def uninterrupted(tiny_world, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("full") / "run")
    p = run_train(STOP_ARGV + world_args(tiny_world) + ["--out", out])
    assert p.returncode == 0, p.stderr[-2000:]
    return out

def same_run(a, b):
    assert open(os.path.join(a, "pairs.jsonl")).read() == open(os.path.join(b, "pairs.jsonl")).read()
    drop = lambda ms: [{k: v for k, v in m.items() if k not in TIMINGS} for m in ms]
    assert drop(read_jsonl(os.path.join(a, "metrics.jsonl"))) == drop(read_jsonl(os.path.join(b, "metrics.jsonl")))
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

@pytest.mark.parametrize("sig,code,name", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")])
def test_ctrl_c_and_sigterm_stop_like_a_kill(sig, code, name, tiny_world, uninterrupted, tmp_path):
    out = str(tmp_path / "run")
    rc, err = stopped_run(tiny_world, out, sig)
    assert rc == code and "Traceback" not in err, err[-2000:]
    last = err.strip().splitlines()[-1]
    n = lines(os.path.join(out, "pairs.jsonl"))
    assert last.startswith(f"train.py: stopped ({name}): {n} labels on disk") and f"--resume {out}" in last, last
    assert not os.path.exists(os.path.join(out, "summary.json"))
    p = run_train(["--resume", out])
    assert p.returncode == 0, p.stderr[-2000:]
    same_run(uninterrupted, out)

# ---- damaged folders: resume checks what it continues

@pytest.fixture(scope="module")
def cut_run(tiny_world, tmp_path_factory):
    """A run stopped part-way (SIGTERM), with pairs on disk past its last checkpoint: copied for each damage."""
    out = str(tmp_path_factory.mktemp("cut") / "run")
    rc, err = stopped_run(tiny_world, out, signal.SIGTERM)
    assert rc == 143, err[-2000:]
    return out

def damaged(cut_run, tmp_path, edit):
    out = str(tmp_path / "run")
    shutil.copytree(cut_run, out)
    edit(out)
    return out

def cut_lines(name, keep):
    def edit(out):
        path = os.path.join(out, name)
        ls = open(path).readlines()
        open(path, "w").writelines(keep(ls))
    return edit

def test_a_torn_last_line_is_dropped_and_the_run_ends_as_one_never_stopped(cut_run, uninterrupted, tmp_path):
    """A kill in the middle of a write leaves a torn last line in pairs.jsonl or metrics.jsonl."""
    def tear(out):
        for name in ("pairs.jsonl", "metrics.jsonl"):
            path = os.path.join(out, name)
            last = open(path).readlines()[-1]
            with open(path, "a") as f:
                f.write(last[:len(last) // 2])
    out = damaged(cut_run, tmp_path, tear)
    p = run_train(["--resume", out])
    assert p.returncode == 0, p.stderr[-2000:]
    same_run(uninterrupted, out)

@pytest.mark.parametrize("what,edit,match", [
    ("metrics cut", cut_lines("metrics.jsonl", lambda ls: ls[:1]), "metrics.jsonl holds 1 evaluations, fewer than"),
    ("pairs cut below the checkpoint", cut_lines("pairs.jsonl", lambda ls: ls[:50]), "pairs.jsonl holds 50 pairs, fewer than"),
    ("a line deleted before the checkpoint", cut_lines("pairs.jsonl", lambda ls: ls[:10] + ls[11:]),
     "are not the ones its checkpoint counted"),
    ("a line edited before the checkpoint", cut_lines("pairs.jsonl", lambda ls: [ls[0].replace('"round": 0', '"round": 0 ')] + ls[1:]),
     "are not the ones its checkpoint counted"),
    ("a line deleted after the checkpoint", cut_lines("pairs.jsonl", lambda ls: ls[:70] + ls[71:]),
     "is not the pair this run drew there"),
    ("garbage checkpoint.json", lambda out: open(os.path.join(out, "checkpoint.json"), "w").write("{ no"), "checkpoint.json is damaged"),
    ("empty checkpoint.json", lambda out: open(os.path.join(out, "checkpoint.json"), "w").write(""), "checkpoint.json is damaged"),
    ("a key missing", lambda out: json.dump({k: v for k, v in json.load(open(os.path.join(out, "checkpoint.json"))).items()
                                              if k != "order"}, open(os.path.join(out, "checkpoint.json") + ".x", "w"))
     or os.replace(os.path.join(out, "checkpoint.json") + ".x", os.path.join(out, "checkpoint.json")), "no 'order'"),
    ("the checkpoint folder deleted", lambda out: shutil.rmtree(os.path.join(out, "checkpoints")), "the checkpoint was removed"),
    ("a label flipped after the checkpoint", lambda out: edit_pair(out, flip), "holds a label or scores its labeller does not give"),
    ("a score edited after the checkpoint", lambda out: edit_pair(out, lambda p: dict(p, chosen_score=p["chosen_score"] + 0.5)),
     "holds a label or scores its labeller does not give"),
    ("a text edited after the checkpoint", lambda out: edit_pair(out, lambda p: dict(p, chosen=p["chosen"] + " .")),
     "is not the pair this run makes there again"),
    ("beta edited", lambda out: edit_config(out, beta=0.2), "config.json is not the one the run started with"),
    ("checkpoint.json naming another run's checkpoint",
     lambda out: edit_pointer(out, dir="../other/checkpoints/labels-0000064"), "not this run's checkpoint at 64 labels"),
    ("a prompt order out of range", lambda out: edit_pointer(out, order=[10 ** 6]), "'order' is not what a run saves there"),
    ("garbage Python RNG state", lambda out: edit_pointer(out, python_rng=[1, 2]), "'python_rng' is not a random state"),
    ("labels a string", lambda out: edit_pointer(out, labels="64"), "its counters are not counts"),
    ("a truncated rng.pt", lambda out: truncate(os.path.join(out, "checkpoints", "labels-0000064", "rng.pt")),
     "rng.pt holds something other than tensors, or is cut short"),
    ("lr edited", lambda out: edit_config(out, lr=-1), "--lr must be > 0"),
    ("sampler edited", lambda out: edit_config(out, sampler="bogus"), "invalid choice: 'bogus'"),
    ("labels edited", lambda out: edit_config(out, labels=1000), "must be a multiple of --batch_size"),
])
def test_a_damaged_folder_is_refused_in_one_line(what, edit, match, cut_run, tmp_path):
    out = damaged(cut_run, tmp_path, edit)
    before = {f: open(os.path.join(out, f)).read() for f in ("pairs.jsonl", "metrics.jsonl") if os.path.exists(os.path.join(out, f))}
    err = one_line_error(run_train(["--resume", out]))
    assert match in err, (what, err)
    assert before == {f: open(os.path.join(out, f)).read() for f in before}, "the refusal changed the folder"

def edit_config(out, **changes):
    path = os.path.join(out, "config.json")
    cfg = json.load(open(path))
    cfg.update(changes)
    json.dump(cfg, open(path, "w"))

def edit_pointer(out, **changes):
    path = os.path.join(out, "checkpoint.json")
    state = dict(json.load(open(path)), **changes)
    json.dump(state, open(path, "w"))

def edit_pair(out, change):
    """Change the first pair after the checkpoint (at 64) whose two responses differ."""
    path = os.path.join(out, "pairs.jsonl")
    pairs = read_jsonl(path)
    i = next(i for i in range(64, len(pairs)) if pairs[i]["chosen_ids"] != pairs[i]["rejected_ids"])
    pairs[i] = change(pairs[i])
    open(path, "w").write("".join(json.dumps(p) + "\n" for p in pairs))

def flip(p):
    """The label the other way round: every chosen_ field swapped with its rejected_ twin."""
    swap = {k: k.replace("chosen", "@").replace("rejected", "chosen").replace("@", "rejected") for k in p}
    return {swap[k]: v for k, v in p.items()}

def truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])

def test_a_pickle_in_a_checkpoint_is_refused_in_one_line(cut_run, tmp_path):
    marker = tmp_path / "RAN"
    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    def plant(out):
        ck = json.load(open(os.path.join(out, "checkpoint.json")))
        torch.save({"state": Payload()}, os.path.join(out, ck["dir"], "optimizer.pt"))
    out = damaged(cut_run, tmp_path, plant)
    err = one_line_error(run_train(["--resume", out]))
    assert "optimizer.pt holds something other than tensors" in err and "weights_only" not in err, err
    assert not marker.exists()

def test_token_ids_of_the_wrong_type_are_refused_in_one_line(cut_run, tmp_path, capsys):
    pairs = read_jsonl(os.path.join(cut_run, "pairs.jsonl"))[:8]
    for bad_id in ("5", 5.5):
        pairs[2]["chosen_ids"][0] = bad_id
        path = tmp_path / "pairs.jsonl"
        path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
        cfg = json.load(open(os.path.join(cut_run, "config.json")))
        bad(["--from_pairs", str(path), "--labels", "8", "--batch_size", "8", "--out", str(tmp_path / "run"),
             "--policy", cfg["policy"], "--oracle", cfg["oracle"], "--prompts", cfg["prompts"]], capsys,
            "line 3: token ids must be a list of integers")

# ---- a full disk

@pytest.fixture
def one_thread():
    """torch on one thread in this process, as in the subprocesses the runs here are compared with."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

def test_a_full_disk_stops_in_one_line_and_the_run_resumes_exactly(tiny_world, uninterrupted, tmp_path, monkeypatch,
                                                                  capsys, one_thread):
    """Writes that fail with ENOSPC (a checkpoint's, or a pair's): one line naming the folder, the disk and
    the last good checkpoint, exit 1; once there is space, --resume ends as a run never stopped."""
    argv = STOP_ARGV + world_args(tiny_world)
    # the pointer of the checkpoint at 128 (checkpoints at 0, 64, 128); a pair past 64
    for where, target, at in ((checkpoint, "write_json", 3), (pairs.Ledger, "write", 100)):
        out = str(tmp_path / target)
        real, calls = getattr(where, target), []
        def full(*a, real=real, calls=calls, at=at):
            calls.append(1)
            if len(calls) >= at:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(*a)
        monkeypatch.setattr(where, target, full)
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            train.main(argv + ["--out", out])
        err = capsys.readouterr().err
        assert "Traceback" not in err, err
        err = re.findall(r"train\.py: .*", err)          # (the progress bar's redraws aside)
        assert e.value.code == 1 and len(err) == 1, err
        assert f"the disk holding {os.path.abspath(out)} is full (No space left on device" in err[0], err
        assert "the last checkpoint at 64" in err[0] and f"--resume {out}" in err[0], err
        monkeypatch.setattr(where, target, real)
        p = run_train(["--resume", out])
        assert p.returncode == 0, p.stderr[-2000:]
        same_run(uninterrupted, out)

# ---- a folder removed under a stopped run; a policy that blows up; another number of processes

def test_a_folder_removed_under_a_stopped_run_is_never_written_by_it(tiny_world, tmp_path):
    """A run stopped (SIGSTOP), its folder deleted and a new run started there: the new run has the
    folder to itself; the old one, continued (SIGCONT), stops in one line at its next write."""
    out = str(tmp_path / "run")
    old = start_train(STOP_ARGV + world_args(tiny_world) + ["--out", out])
    while lines(os.path.join(out, "pairs.jsonl")) < 16 and old.poll() is None:
        time.sleep(0.002)
    old.send_signal(signal.SIGSTOP)
    shutil.rmtree(out)
    new = run_train(["--seed", "1", "--out", out] + MICRO + world_args(tiny_world))
    assert new.returncode == 0, new.stderr[-2000:]
    done = {f: open(os.path.join(out, f)).read() for f in ("pairs.jsonl", "metrics.jsonl", "config.json", "checkpoint.json")}
    old.send_signal(signal.SIGCONT)
    _, err = old.communicate(timeout=600)
    last = err.strip().splitlines()[-1]
    assert old.returncode == 1 and "Traceback" not in err and f"{out} was removed or replaced" in last, err[-2000:]
    assert done == {f: open(os.path.join(out, f)).read() for f in done}
    assert json.load(open(os.path.join(out, "config.json")))["seed"] == 1

def test_a_policy_that_blows_up_stops_in_one_line_with_a_finite_checkpoint(tiny_world, tmp_path):
    out = str(tmp_path / "run")
    p = run_train(["--lr", "1e6", "--out", out, "--save_every", "8"] + MICRO + world_args(tiny_world))
    err = p.stderr.strip().splitlines()
    assert p.returncode == 1 and err and err[-1].startswith("train.py: stopped") and "not finite" in err[-1], p.stderr[-2000:]
    assert "Traceback" not in p.stderr and not os.path.exists(os.path.join(out, "summary.json"))
    ck = json.load(open(os.path.join(out, "checkpoint.json")))
    from safetensors.torch import load_file
    w = load_file(os.path.join(out, ck["dir"], "policy", "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in w.values())

def test_a_resume_with_another_number_of_processes_says_the_whole_fix(cut_run, monkeypatch, capsys, tmp_path):
    """The run was made by one process; a resume under torchrun (two, played here) names the command that works."""
    import ddp
    out = damaged(cut_run, tmp_path, lambda out: None)
    monkeypatch.setattr(ddp, "nproc", 2)
    bad(["--resume", out], capsys, "the run was made with 1 processes, this is 2 -- resume it with plain python train.py")
