"""The embedded world's reference, its oracle reward spread: 16 samples of each of 100 training prompts,
the standard deviation within a prompt (averaged over prompts) and overall. (experiments/path/protocol.md)"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import omp  # noqa: E402,F401  (first of the project: how the CPU threads wait)

import torch

import load  # noqa: E402
import world  # noqa: E402
from oracle import Oracle  # noqa: E402
from pairs import decode, tokenize  # noqa: E402
from sample import generate  # noqa: E402

d = world.ensure()
ref, tok = load.load_policy(os.path.join(d, "policy"))
oracle = Oracle(*load.load_oracle(os.path.join(d, "oracle")))
prompts, _ = load.load_prompts(os.path.join(d, "prompts"))
texts = prompts[:100] * 16
ids, mask = tokenize(tok, texts, "cpu")
out, out_mask, _ = generate([ref], [1.0], ids, mask, 32, load.eos_ids(ref, tok), tok.pad_token_id, 1.0,
                            torch.Generator().manual_seed(0))
r = oracle.score(texts, decode(tok, out, out_mask)).view(16, 100)
print(f"oracle reward of the reference's samples: within-prompt sd {r.std(0).mean():.2f}, overall sd {r.std():.2f}, "
      f"mean {r.mean():.2f}, max {r.max():.2f}")
