"""notebooks/live_calls.ipynb, executed end to end in a real Jupyter kernel."""

from __future__ import annotations

import base64
import io
import os
import time
from pathlib import Path

import duckdb  # noqa: F401  (the notebook queries Parquet with it)
import ipykernel  # noqa: F401  (the notebook runs in it)
import matplotlib.image as mpimg
import nbclient
import nbformat
import numpy as np
import pytest

import npcalls

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "live_calls.ipynb"


def _processes_using(directory):
    """Pids whose environment names this table directory (the simulator and its workers)."""
    pids = []
    needle = f"NPCALLS_DIR={directory}".encode()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if needle in env:
            pids.append(int(d))
    return pids


def _png_ok(data: bytes) -> tuple[int, int]:
    img = mpimg.imread(io.BytesIO(data), format="png")
    h, w = img.shape[:2]
    assert w >= 300 and h >= 150
    colours = np.unique((img[..., :3].reshape(-1, 3) * 255).astype(np.uint8), axis=0)
    assert len(colours) > 20, "a blank plot"
    return w, h


@pytest.mark.timeout(300)
def test_live_calls_notebook_runs_clean(tdir, tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # the stored notebook carries no outputs: what runs here is what readers run
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
    client = nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    t0 = time.monotonic()
    client.execute()
    elapsed = time.monotonic() - t0

    errors, pngs, html, text = [], [], [], []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for o in cell.outputs:
            if o.output_type == "error":
                errors.append(f"{o.ename}: {o.evalue}")
            if o.output_type == "stream":
                if o.name == "stderr" and o.text.strip():
                    errors.append(f"stderr: {o.text}")
                text.append(o.text)
            data = o.get("data", {})
            if "image/png" in data:
                pngs.append(base64.b64decode(data["image/png"]))
            if "text/html" in data:
                html.append(data["text/html"])
            if "text/plain" in data:
                text.append(data["text/plain"])
    assert not errors, errors
    out = "\n".join(text)
    all_html = "\n".join(html)

    # three plots of the live table, the live view's plot(s), the Kamailio figure
    assert len(pngs) >= 5, len(pngs)
    for p in pngs:
        _png_ok(p)
    # the DataFrame, the stats, the live panel, the DuckDB result
    assert "call_id" in all_html and "duration" in all_html
    assert "starts/s" in all_html                                  # the live view's panel
    assert "edge-2" in all_html and "kamailio" in all_html          # the fleet query
    if hasattr(npcalls.CallTable, "_repr_html_"):
        assert "Longest active calls" in all_html                    # the table's rich repr
    assert "1,000 calls from" in out                                 # the Kamailio log loaded
    assert "Longest active calls" in out                             # npcalls top --once
    assert "hung up at exit" in out and "removed" in out             # it cleaned up

    # it stopped what it started and removed what it created
    deadline = time.monotonic() + 10         # the kernel itself may still be exiting
    while _processes_using(tdir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_using(tdir) == []
    assert os.listdir(tdir) == []
    assert elapsed < 150, f"the notebook took {elapsed:.0f} s"
