"""experiments/gradients_n/protocol.md's analysis: G2' and the secondary contrasts, from gradients.py's --json
files (their batches pooled). Usage: python experiments/gradients_n/analyse.py far-0.json far-10000.json"""
import json
import math
import sys

sys.path.insert(0, __file__.rsplit("/experiments/", 1)[0])
from stats import mean_ci  # noqa: E402

def paired(x, y):
    """x - y per batch, batches where either is nan left out: (mean, 95% half-width, count)."""
    d = [a - b for a, b in zip(x, y) if not (math.isnan(a) or math.isnan(b))]
    return (*mean_ci(d), len(d))

got = {}
for path in sys.argv[1:]:
    for k, v in json.load(open(path))[0]["cosines"].items():
        got.setdefault(k, []).extend(v)
rows = [("G2′ (primary): T-PILAF, cos(Σ∇J_x/C) − cos(∇J)", got["t_pilaf/C"], got["t_pilaf"]),
        ("Vanilla, cos(Σ∇J_x/C) − cos(∇J)", got["vanilla/C"], got["vanilla"]),
        ("T-PILAF − Vanilla, against ∇J", got["t_pilaf"], got["vanilla"]),
        ("T-PILAF − Vanilla, against Σ∇J_x/C", got["t_pilaf/C"], got["vanilla/C"])]
print("| contrast | mean ± 95% | batches |\n|---|---|---|")
for name, x, y in rows:
    m, h, n = paired(x, y)
    print(f"| {name} | {m:+.3f} ± {h:.3f} | {n} |")
