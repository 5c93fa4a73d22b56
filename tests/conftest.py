"""What the tests share: a tiny embedded world (built once per session, in seconds), tiny models and
mock LMs small enough to check by brute force, and the helpers that run train.py and read what it
wrote. Test modules import from here and from the project, never from each other."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

# tests never touch the network: set before transformers (and huggingface_hub under it) is imported,
# which reads these once, at import
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import load  # noqa: E402
import options  # noqa: E402
import world  # noqa: E402

TINY_WORLD = dict(world.WORLD, sft_examples=1500, sft_epochs=1, rm_examples=1500, rm_epochs=1,
                  n_layer=1, n_embd=32, rm_layer=1, rm_embd=32, rm_vocab=300)

@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("world"))
    world.build(d, TINY_WORLD)
    return d

@pytest.fixture(scope="session")
def embedded_world():
    """train.py's default world (world.DEFAULT_DIR), built if it is not cached: the notebooks and the
    training test use the real thing."""
    return world.ensure()

def pytest_collection_finish(session):
    """The embedded world takes minutes to build the first time, on one thread: when a collected test
    needs it and it is not cached, its build starts now in a process of its own, on the core the tests
    before those leave idle; embedded_world's world.ensure() then waits on the build's lock."""
    if any("embedded_world" in getattr(i, "fixturenames", ()) for i in session.items) and \
            not world._built(world.DEFAULT_DIR, world.WORLD):
        session.config.world_build = subprocess.Popen([sys.executable, "-c", "import omp, world; world.ensure()"], cwd=ROOT,
                                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

def pytest_sessionfinish(session):
    """A build still going when the tests end (a run of a few tests) is stopped; the next build clears
    what it left."""
    build = getattr(session.config, "world_build", None)
    if build is not None and build.poll() is None:
        build.kill()
        build.wait()

# ---- train.py on the tiny world

# a micro budget: 32 labels, 4 DPO steps of 8 pairs, evaluations at 0, 16 and 32 labels
MICRO = ["--labels", "32", "--batch_size", "8", "--eval_every", "16", "--eval_prompts", "8", "--eval_samples", "1",
         "--max_new_tokens", "12"]
TIMINGS = ("time", "tok_per_s", "reused")    # how long it took, and how many labels came from disk

def world_args(d):
    """The options that name the tiny world in folder d."""
    return ["--policy", os.path.join(d, "policy"), "--oracle", os.path.join(d, "oracle"), "--prompts", os.path.join(d, "prompts")]

def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]

def lines(path):
    """Complete lines in a file (0 if it is not there yet)."""
    return open(path).read().count("\n") if os.path.exists(path) else 0

def weights(run):
    """The final policy's tensors of run folder `run` (or of any save_pretrained folder's policy/)."""
    return load_file(os.path.join(run, "policy", "model.safetensors"))

def bad(argv, capsys, match):
    """train.main(argv) must end in one line on stderr naming `match`, exit code 2."""
    import train
    capsys.readouterr()   # only what train.py prints counts
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and match in err, err

# ---- tiny models and hand-made logits

EOS, PAD, BETA = 0, 1, 0.1
PROMPTS = [[3, 4, 5, 6, 7], [8, 2], [5, 5, 9, 10], [11]]    # token ids of prompts of different lengths
H_POL = [2.0, 0.5, -1.0, 1.0, 0.0]                          # next-token logits of a policy and a reference
H_REF = [0.0, 1.0, 0.5, -0.5, 0.3]

def tiny_lm(seed, vocab=12, n_positions=48, dtype=torch.float64):
    """A random GPT-2 small enough to decode by brute force (float64: cached == uncached to ~1e-12)."""
    torch.manual_seed(seed)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=n_positions, n_layer=2, n_head=2, n_embd=16,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=1))
    return m.to(dtype).eval()

def left_padded(rows):
    """Token lists -> left-padded ids, mask (B, L)."""
    L = max(map(len, rows))
    ids = torch.tensor([[PAD] * (L - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    return ids, mask

class FixedLogits(torch.nn.Module):
    """A mock LM whose next-token logits never depend on the input: for exact distribution checks."""
    device = torch.device("cpu")

    def __init__(self, logits):
        super().__init__()
        self.h = torch.tensor(logits, dtype=torch.float64)
        self.calls = 0

    def forward(self, input_ids, cache=None, logits_to_keep=0, **kw):
        self.calls += 1
        B, T = input_ids.shape
        return SimpleNamespace(logits=self.h.expand(B, logits_to_keep or T, -1), cache=(cache or 0) + 1)

class CountingLM(torch.nn.Module):
    """Wraps a model and records every call it gets: the shapes of its tokens and of its attention mask.
    Models given one `log` list also leave themselves there at each call: the order they were called in."""
    def __init__(self, model, log=None):
        super().__init__()
        self.model, self.calls, self.log = model, [], log

    @property
    def rows(self):
        """Rows stepped, over all calls."""
        return sum(ids[0] for ids, _ in self.calls)

    def forward(self, input_ids, attention_mask, **kw):
        self.calls.append((tuple(input_ids.shape), tuple(attention_mask.shape)))
        if self.log is not None:
            self.log.append(self)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kw)

N_PROMPTS = 8000   # prompts in the samplers' statistical checks: a frequency off by > 4 standard errors has odds ~1e-4

def one_token_pairs(name, h_pol, h_ref, beta, seed=0, **kw):
    """Run sampler `name` on N_PROMPTS identical one-token prompts with input-independent logits."""
    import pilaf
    gen = dict(max_new_tokens=1, eos_id=99, pad_id=PAD, temperature=1.0, generator=torch.Generator().manual_seed(seed))
    return pilaf.SAMPLERS[name](FixedLogits(h_pol), FixedLogits(h_ref), torch.full((N_PROMPTS, 1), 3),
                                torch.ones(N_PROMPTS, 1, dtype=torch.long), beta, gen, **kw)

def standin_reward_model(path, with_pad):
    """A hub-style reward model saved to a folder: GPT-2 classifier, byte-level BPE tokenizer. -> loaded"""
    tok = world._bpe_tokenizer(["customer : my lamp arrived broken . agent : sorry about that ."] * 50, 280)
    if not with_pad:       # like many hub tokenizers (GPT-2's, Llama's): no pad token
        tok.pad_token = None
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(GPT2Config(vocab_size=len(tok), n_positions=64, n_layer=1, n_head=2,
                                                     n_embd=16, num_labels=1, pad_token_id=tok.pad_token_id))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return load.load_oracle(str(path))

def fake_run(out, sampler, seed, J, labels=(0, 16, 32), budget=32, **config):
    """A finished run folder written by hand (config, metrics, summary) for the statistics and the report."""
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
