"""The fork seams the README names, each done in a copy of the repository and trained with end to end:
a sampler with an option of its own touches pilaf.py and options.py, nothing else; a labeller behind
an API is one class and one LABELLERS entry in oracle.py."""
import json
import os
import shutil
import subprocess
import sys

from conftest import MICRO, world_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SAMPLER = '''

def two_temps(policy, ref, prompt_ids, prompt_mask, beta, gen, hot=2.0):
    """A fork's sampler: one response at the run's temperature, the other at `hot`."""
    B = prompt_ids.shape[0]
    a = generate([policy], [1.0], prompt_ids, prompt_mask, **gen)
    b = generate([policy], [1.0], prompt_ids, prompt_mask, **dict(gen, temperature=hot))
    return dict(a=a[0], a_mask=a[1], a_logps=a[2], b=b[0], b_mask=b[1], b_logps=b[2],
                src=[("pi", f"pi@T{hot}")] * B, forwards=2 * B, score_forwards=0)

SAMPLERS["two_temps"] = two_temps
OPTIONS["two_temps"] = ["hot"]
'''
OPTION = '''    g.add_argument("--hot", type=float, default=2.0, help="two_temps: the second response's temperature")
'''

def fork_of(tmp_path):
    """A copy of the repository's code, to change as a fork would."""
    fork = tmp_path / "fork"
    shutil.copytree(ROOT, fork, ignore=shutil.ignore_patterns(".git", ".venv", "tests", "notebooks", "out", "results",
                                                              "experiments", "__pycache__"))
    return fork

def test_a_new_sampler_with_its_own_option_touches_two_files(tiny_world, tmp_path):
    fork = fork_of(tmp_path)
    with open(fork / "pilaf.py", "a") as f:
        f.write(SAMPLER)
    opts = (fork / "options.py").read_text()
    anchor = 'g.add_argument("--n", '
    assert anchor in opts
    at = opts.index("\n", opts.index(anchor)) + 1          # the line after --n, in the sampler-options group
    (fork / "options.py").write_text(opts[:at] + OPTION + opts[at:])

    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = str(tmp_path / "run")
    p = subprocess.run([sys.executable, str(fork / "train.py"), "--sampler", "two_temps", "--hot", "3", "--out", out]
                       + MICRO + world_args(tiny_world), cwd=fork, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    with open(os.path.join(out, "pairs.jsonl")) as f:
        pairs = [json.loads(line) for line in f]
    srcs = {s for q in pairs for s in (q["chosen_src"], q["rejected_src"])}
    assert len(pairs) == 32 and srcs == {"pi", "pi@T3.0"}             # the sampler ran, with the option's value
    # compare.py's fairness check counts the new option without being told
    p = subprocess.run([sys.executable, "-c", "import compare; print('hot' in compare.budget_keys())"], cwd=fork,
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.stdout.strip() == "True", p.stderr[-2000:]

LABELLER = '''

class Shorter(Labeller):
    """A fork's labeller, standing in for one behind an API: the shorter response wins."""
    def __init__(self, judge, args):
        self.asked = 0

    def label(self, prompts, a, b, u, n=0):
        for x, y in zip(a, b):
            self.asked += 1
            yield Label(len(x.ids) <= len(y.ids), float(-len(x.ids)), float(-len(y.ids)))

LABELLERS["shorter"] = Shorter
'''

def test_an_api_labeller_is_one_class_and_one_entry(tiny_world, tmp_path):
    fork = fork_of(tmp_path)
    with open(fork / "oracle.py", "a") as f:
        f.write(LABELLER)
    w = world_args(tiny_world)
    out = str(tmp_path / "run")
    p = subprocess.run([sys.executable, str(fork / "train.py"), "--oracle", "shorter", "--judge", w[3], "--policy", w[1],
                        "--prompts", w[5], "--out", out] + MICRO, cwd=fork, env=dict(os.environ, OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    with open(os.path.join(out, "pairs.jsonl")) as f:
        pairs = [json.loads(line) for line in f]
    assert len(pairs) == 32 and all(len(q["chosen_ids"]) <= len(q["rejected_ids"]) for q in pairs)   # its rule
    assert all(q["chosen_score"] == -len(q["chosen_ids"]) for q in pairs)
    assert any(len(q["chosen_ids"]) < len(q["rejected_ids"]) for q in pairs)                    # not all ties
    with open(os.path.join(out, "summary.json")) as f:
        last = json.load(f)
    assert last["labels"] == 32 and "reward" in last and "answered" not in last   # the judge scored; the defaults of Labeller
