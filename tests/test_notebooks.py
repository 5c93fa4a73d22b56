"""Every notebook in notebooks/ runs top to bottom without an error and draws at least one figure.

Each notebook is executed from an in-memory copy (the committed file is never rewritten), with its
working directory in notebooks/, by a kernel running THIS interpreter: a kernel spec written to a
temporary folder names sys.executable, so an unrelated 'python3' kernel spec installed elsewhere on
the machine cannot slip in another Python. The notebooks that need the embedded world build it with
world.ensure() (a few minutes the first time, then cached).
"""
import json
import os
import sys

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

NB_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
NOTEBOOKS = sorted(f for f in os.listdir(NB_DIR) if f.endswith(".ipynb")) if os.path.isdir(NB_DIR) else []
CELL_TIMEOUT = int(os.environ.get("PILAF_NOTEBOOK_TIMEOUT", "600"))  # seconds per cell (a world build fits)
KERNEL = "pilaf-test-python"

def this_interpreter_kernel(tmp_path):
    """A kernel manager whose kernel is `sys.executable -m ipykernel_launcher`."""
    spec_dir = tmp_path / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = dict(argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                display_name=f"pilaf tests ({sys.executable})", language="python")
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")], ensure_native_kernel=False)
    return AsyncKernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)

@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path):
    nb = nbformat.read(os.path.join(NB_DIR, name), as_version=4)
    n_cells = len(nb.cells)
    # one extra cell at the end reports which Python ran the notebook
    nb.cells.append(nbformat.v4.new_code_cell("import json, sys; print(json.dumps([sys.executable, sys.prefix]))"))
    client = NotebookClient(nb, km=this_interpreter_kernel(tmp_path), timeout=CELL_TIMEOUT,
                            allow_errors=False, resources={"metadata": {"path": NB_DIR}})
    try:
        client.execute()       # raises CellExecutionError, naming the cell, on the first error
    finally:
        nbformat.write(nb, str(tmp_path / name))   # the executed copy, for a look when something fails

    (probe,) = [o for o in nb.cells[-1].outputs if o.output_type == "stream"]
    assert json.loads(probe["text"]) == [sys.executable, sys.prefix], "the kernel ran another Python"
    cells = nb.cells[:n_cells]
    outputs = [o for c in cells if c.cell_type == "code" for o in c.outputs]
    assert all(c.execution_count is not None for c in cells if c.cell_type == "code"), "a code cell did not run"
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{name} drew no figure"
