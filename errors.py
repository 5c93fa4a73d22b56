"""
The two ways a command ends before its end, each said in one line and never as a traceback:

    UserError   the user's mistake (a bad option, a missing file, a damaged run folder): one line naming
                the fix, exit code 2, like argparse; raised where it is found, said by die() at the top
    Stop        a run that stops before its end (Ctrl-C, SIGTERM, a person's q, a full disk, weights gone
                non-finite): it ends like a kill, everything it bought on disk, and says how to go on

Under torchrun every rank meets the same end (the checks are the same on every rank): rank 0 says it and
exits with the code, which becomes the job's; the others leave quietly.
"""
import os
import sys

class UserError(Exception):
    """Bad input the user can fix: one line naming the fix, exit code 2."""

class Stop(Exception):
    """The run stops before its end, like a kill. `why`: what happened, for the line (empty: a person's
    q); `code`: the exit code; `fix`: what to do, if not to continue with --resume; `on_screen`: said on
    stdout, where a person labelling in this terminal reads, rather than on stderr."""
    def __init__(self, why, code=1, fix=None, on_screen=False):
        super().__init__(why)
        self.why, self.code, self.fix, self.on_screen = why, code, fix, on_screen

def die(msg, prog="train.py"):
    """Bad input: one line naming the fix, exit code 2, nothing else."""
    leave(f"{prog}: error: {msg}", 2)

def leave(line, code):
    """End with one line on stderr and `code`. Under torchrun rank 0 says it; the others leave with 0,
    since torchrun stops the whole job as soon as one rank exits with an error, and would stop rank 0
    before its line was out."""
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr)
        sys.exit(code)
    sys.exit(0)
