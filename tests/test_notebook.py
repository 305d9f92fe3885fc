"""Execute examples/quickstart.ipynb headless (nbclient + ipykernel) so that it cannot rot."""

import time
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "quickstart.ipynb"


def test_quickstart_notebook_runs(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    t0 = time.perf_counter()
    # A failing cell raises nbclient.exceptions.CellExecutionError with the cell's traceback.
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    elapsed = time.perf_counter() - t0
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    data = [o.get("data", {}) for o in outputs]
    assert any("image/png" in d for d in data), "the loss / spectrum plot was not drawn"
    html = [d["text/html"] for d in data if "text/html" in d]
    assert html and "TrainingStats" in html[0] and "ReLoRA* cycles" in html[0]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "5 cycles" in text and "ReLoRA*" in text  # the run and its progress bar
    print(f"quickstart.ipynb executed in {elapsed:.1f} s")
