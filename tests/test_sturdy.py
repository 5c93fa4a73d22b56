"""Sturdy where it matters: no foreign code on any load, one writer per run folder, signals, damaged
folders, a full disk, settings that would waste paid labels."""
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset, DatasetDict

import checkpoint
import pairs
import train
from conftest import MICRO, TIMINGS, TINY_WORLD, bad, lines, read_jsonl, weights, world_args

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

def test_a_resume_with_another_number_of_processes_says_the_whole_fix(cut_run, monkeypatch, capsys, tmp_path):
    """The run was made by one process; a resume under torchrun (two, played here) names the command that works."""
    import ddp
    out = damaged(cut_run, tmp_path, lambda out: None)
    monkeypatch.setattr(ddp, "nproc", 2)
    bad(["--resume", out], capsys, "the run was made with 1 processes, this is 2 -- resume it with plain python train.py")

def test_compares_help_shows_no_default_of_none(capsys):
    import compare
    with pytest.raises(SystemExit):
        compare.get_args(["--help"])
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "(default: online)" in text
