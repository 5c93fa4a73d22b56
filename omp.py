"""
Sharing a CPU with other jobs. Imported first by every entry point (train.py, compare.py, bench.py,
world.py, the notebooks), because it only works before torch loads its OpenMP runtime.

torch's CPU threads are GNU OpenMP's, and by default a thread that waits at a barrier spins for
300,000 rounds before it sleeps. Alone on a machine that wins a little. But two jobs that each run
torch's default threads on the same cores spin against each other at every one of the thousands of
small barriers a run makes (a decode step, a small matrix product). A short spin keeps the speed alone
and gives each job its fair share when two run at once (measured: docs/performance.md, "A shared
machine"). A value the user set (GOMP_SPINCOUNT or OMP_WAIT_POLICY) is left as it is.
"""
import os

if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "1000"
