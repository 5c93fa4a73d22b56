"""Every entry point sets OpenMP's waiting before torch loads (omp.py says why), unless the user set it."""
import ast
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_POINTS = ["train.py", "compare.py", "bench.py", "world.py"]

def first_import(source):
    tree = ast.parse(source)
    node = next(n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom)))
    return node.names[0].name if isinstance(node, ast.Import) else node.module

@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_omp_is_the_first_import(name):
    with open(os.path.join(ROOT, name)) as f:
        assert first_import(f.read()) == "omp"

@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(ROOT, "notebooks"))))
def test_a_notebook_imports_omp_before_torch(name):
    nb = json.load(open(os.path.join(ROOT, "notebooks", name)))
    src = "".join(next(c for c in nb["cells"] if c["cell_type"] == "code")["source"])
    lines = [l for l in src.splitlines() if not l.startswith("%")]
    imports = [first_import(l) for l in lines if l.startswith(("import ", "from "))]
    assert "omp" in imports and ("torch" not in imports or imports.index("omp") < imports.index("torch")), imports

@pytest.mark.parametrize("given,expect", [({}, "1000"), ({"GOMP_SPINCOUNT": "7"}, "7"),
                                          ({"OMP_WAIT_POLICY": "ACTIVE"}, None)])
def test_the_spin_count_is_set_unless_the_user_set_one(given, expect):
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    p = subprocess.run([sys.executable, "-c", "import os, sys, train; print(os.environ.get('GOMP_SPINCOUNT'), "
                        "'torch' in sys.modules)"], cwd=ROOT, env=dict(env, **given), capture_output=True, text=True)
    assert p.stdout.split() == [str(expect), "True"], p.stderr[-2000:]
