"""
Sharing a CPU with other jobs. Imported first by every entry point (train.py, compare.py, bench.py,
world.py, the notebooks), because it only works before torch loads its OpenMP runtime.

torch's CPU threads are GNU OpenMP's, and by default a thread that waits at a barrier spins for
300,000 rounds before it sleeps. Alone on a machine that wins a little. But two jobs that each run
torch's default threads on the same cores spin against each other at every one of the thousands of
small barriers a run makes (a decode step, a small matrix product). Measured on 2 cores (AMD EPYC,
torch 2.13.0), the default `python train.py --sampler pilaf`, medians:

    setting                     alone    beside a second such run (each)
    OpenMP's default            33 s     370 s   (11x)
    GOMP_SPINCOUNT=1000         35 s      57 s   (1.6x)   <- this file's choice
    GOMP_SPINCOUNT=3000         29 s      86 s   (2.6x, noisy alone: 27-37 s)
    OMP_WAIT_POLICY=PASSIVE     55 s       -     (no spinning at all: slow even alone)

A short spin keeps the speed alone (within this machine's noise) and gives each job its fair share
when two run at once. A value the user set (GOMP_SPINCOUNT or OMP_WAIT_POLICY) is left as it is.
"""
import os

if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "1000"
