"""
The metrics log: <run>/metrics.jsonl, one JSON line per evaluation (docs/metrics.md says what each
key means), appended and flushed, with the run's counters and the training statistics since the last
evaluation; and the line the console shows for it. Under torchrun rank 0 writes and prints.
"""
import json
import os
import time

from tqdm import tqdm

import ddp
from folder import read_lines, still_ours, write_text

class Log:
    """metrics.jsonl of the run folder `out`. A resumed run keeps the checkpoint's `keep` lines: the
    evaluations after it are made again, identically."""
    def __init__(self, out, report, keep=0):
        self.path, self.report = os.path.join(out, "metrics.jsonl"), report
        if ddp.rank == 0:
            write_text(self.path, "".join(read_lines(self.path)[:keep]))

    def __call__(self, run, m):
        """An evaluation `m`, with the counters and the training statistics since the last one: appended,
        printed, and kept as run.last."""
        m.update(step=run.steps, labels=run.labels, reused=run.reused, forwards=run.forwards,
                 fwd_per_pair=run.forwards / max(run.labels, 1), score_fwd_per_pair=run.score_forwards / max(run.labels, 1),
                 judged_per_label=run.judged / max(run.labels, 1),
                 tok_per_s=run.tokens / max(run.sample_s, 1e-9), time=time.time() - run.t0)
        if run.train_log:
            m.update({k: sum(x[k] for x in run.train_log) / len(run.train_log) for k in run.train_log[0]})
            run.train_log.clear()
        m.update(self.report(run.tally))
        run.metrics += 1
        run.last = m
        if ddp.rank:
            return
        still_ours()
        with open(self.path, "a") as f:
            f.write(json.dumps(m) + "\n")
        tqdm.write(f"step {m['step']:4d} | labels {m['labels']:5d} | reward {m['reward']:6.3f} | KL {m['kl']:6.2f} | "
                   f"J {m['J']:6.3f} | acc {m.get('acc', float('nan')):.2f} | len {m['len']:5.1f} | {m['time']:5.0f}s")
        if m.get("answered"):
            tqdm.write(f"you answered {m['answered']} pairs and skipped {m['skipped']}; the judge agreed with "
                       f"{m['agree']:.0%} of your answers")
