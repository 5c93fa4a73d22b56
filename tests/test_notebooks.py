"""Every notebook in notebooks/ runs top to bottom without an error and draws at least one figure.

Each notebook is executed from an in-memory copy (the committed file is never rewritten), with its
working directory in notebooks/, by a kernel running THIS interpreter: a kernel spec written to a
temporary folder names sys.executable, so an unrelated 'python3' kernel spec installed elsewhere on
the machine cannot slip in another Python. The notebooks use the embedded world, which
the embedded_world fixture builds first where it is not cached (conftest.py).

Nothing is written into the repository: a notebook that trains (03_results: its small comparison) trains into
$PILAF_NOTEBOOK_OUT, which the test points at a new temporary folder, so it always trains afresh with the current
train.py; the test checks that the runs are there, and that no file a notebook could have written appeared or
changed under the repository (a user's own runs in out/ may go on meanwhile).
"""
import json
import os
import sys

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from jupyter_core.utils import run_sync
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NB_DIR = os.path.join(ROOT, "notebooks")
NOTEBOOKS = sorted(f for f in os.listdir(NB_DIR) if f.endswith(".ipynb")) if os.path.isdir(NB_DIR) else []
CELL_TIMEOUT = int(os.environ.get("PILAF_NOTEBOOK_TIMEOUT", "600"))  # seconds per cell (a world build fits)
KERNEL = "pilaf-test-python"
TRAINS = {"03_results.ipynb": [f"{s}-s{seed}" for s in ("best_of_n", "hybrid", "pilaf", "vanilla") for seed in (0, 1)],
          "04_gradients.ipynb": ["overfit", "pilaf-end", "pilaf-mid"]}    # the runs each training notebook makes

def this_interpreter_kernel(tmp_path):
    """A kernel manager whose kernel is `sys.executable -m ipykernel_launcher`."""
    spec_dir = tmp_path / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = dict(argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                display_name=f"pilaf tests ({sys.executable})", language="python")
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")], ensure_native_kernel=False)
    return AsyncKernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)

# where other processes write while the notebooks run: a user's own runs (out/, as the README's Quick start makes),
# the environment, caches; a notebook's own output under out/ (out/notebook*) is still checked
NOT_NOTEBOOKS = {".git", "__pycache__", ".pytest_cache", ".venv"}

def repo_files(root=ROOT):
    """{path: mtime} of every file under `root` that a notebook could have written: out/ holds the
    user's runs and is left out, except the notebooks' own out/notebook* folders."""
    found = {}
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in NOT_NOTEBOOKS and not (d == root and x == "out")]
        found.update({os.path.join(d, f): os.path.getmtime(os.path.join(d, f)) for f in files})
    out = os.path.join(root, "out")
    for name in (os.listdir(out) if os.path.isdir(out) else []):
        if name.startswith("notebook"):
            found.update(repo_files(os.path.join(out, name)) or {os.path.join(out, name): 0.0})
    return found

def written(before, after, root=ROOT):
    """The files that appeared or changed between two repo_files() readings, relative to root."""
    return sorted(os.path.relpath(f, root) for f in set(before) | set(after) if before.get(f) != after.get(f))

def test_the_write_check_ignores_a_users_runs_but_not_a_notebooks_files(tmp_path):
    root = str(tmp_path)
    (tmp_path / "notebooks").mkdir()
    before = repo_files(root)
    (tmp_path / "out" / "pilaf-online-s0").mkdir(parents=True)          # a user's run going on meanwhile
    (tmp_path / "out" / "pilaf-online-s0" / "pairs.jsonl").write_text("{}\n")
    assert written(before, repo_files(root), root) == []
    (tmp_path / "notebooks" / "figure.png").write_bytes(b"png")         # a notebook writing into the repository
    (tmp_path / "out" / "notebook03").mkdir()
    (tmp_path / "out" / "notebook03" / "results.md").write_text("x")
    assert written(before, repo_files(root), root) == [os.path.join("notebooks", "figure.png"),
                                                        os.path.join("out", "notebook03", "results.md")]

@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path, monkeypatch, embedded_world):
    nb = nbformat.read(os.path.join(NB_DIR, name), as_version=4)
    trains = any("PILAF_NOTEBOOK_OUT" in c.source for c in nb.cells if c.cell_type == "code")
    runs = tmp_path / "notebook-out"             # a new folder: a notebook that trains must train afresh
    monkeypatch.setenv("PILAF_NOTEBOOK_OUT", str(runs))   # the kernel inherits this process's environment
    before = repo_files()
    n_cells = len(nb.cells)
    # one extra cell at the end reports which Python ran the notebook
    nb.cells.append(nbformat.v4.new_code_cell("import json, sys; print(json.dumps([sys.executable, sys.prefix]))"))
    km = this_interpreter_kernel(tmp_path)
    client = NotebookClient(nb, km=km, timeout=CELL_TIMEOUT, allow_errors=False, resources={"metadata": {"path": NB_DIR}})
    try:
        client.execute()       # raises CellExecutionError, naming the cell, on the first error
    finally:
        nbformat.write(nb, str(tmp_path / name))   # the executed copy, for a look when something fails
        if km.has_kernel:      # a kernel manager we made is ours to stop: nbclient stops only its own
            run_sync(km.shutdown_kernel)(now=True)

    (probe,) = [o for o in nb.cells[-1].outputs if o.output_type == "stream"]
    assert json.loads(probe["text"]) == [sys.executable, sys.prefix], "the kernel ran another Python"
    cells = nb.cells[:n_cells]
    outputs = [o for c in cells if c.cell_type == "code" for o in c.outputs]
    assert all(c.execution_count is not None for c in cells if c.cell_type == "code"), "a code cell did not run"
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{name} drew no figure"

    changed = written(before, repo_files())
    assert not changed, f"{name} wrote into the repository: {changed}"
    if trains:   # its runs were trained now, in the temporary folder
        done = sorted(d.name for d in runs.iterdir() if (d / "summary.json").exists() and (d / "metrics.jsonl").stat().st_size)
        assert done == TRAINS[name], done
    if name == "03_results.ipynb":
        assert (runs / "results.md").exists()
        assert any("trained the small comparison" in o.get("text", "") for o in outputs), "it read old runs back"
