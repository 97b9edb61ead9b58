"""The core's layers import downward only (README, "Layout of the repository").

Each core module may import (at run time: module level or inside a function;
``if TYPE_CHECKING:`` blocks excepted) only modules of the layers below its
own.  The layers are read from the source with ``ast``, so a new upward import
fails here before it makes a cycle or pulls a higher layer into the core.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

import npcalls

PKG = pathlib.Path(npcalls.__file__).parent

# Lowest first.  A module imports only modules of earlier rows.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "crashpoints", "hashing", "buckets", "files"),
    ("layout", "keys", "locking"),          # import errors (and files) only
    ("timestamps", "storage", "readlock"),
    ("protocol",),                          # the words writers touch, and their order
    ("probe",),                             # finding keys (vectorized and single-key)
    ("batching", "scan", "lifecycle"),      # batch semantics, whole-table reads, files
    ("maintenance", "single", "many"),      # rebuild/grow/expire/check; start/stop/get; *_many
    ("display",),                           # names CallTable for type checking only
    ("table",),                             # CallTable, the facade
]
LAYER_OF = {m: i for i, row in enumerate(LAYERS) for m in row}


def _runtime_imports(path: pathlib.Path) -> set[str]:
    """The npcalls modules ``path`` imports at run time (TYPE_CHECKING blocks excepted)."""
    tree = ast.parse(path.read_text())
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(n) for n in ast.walk(node))
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                if node.module:
                    out.add(node.module.split(".")[0])
                else:
                    out.update(a.name for a in node.names)
            elif node.level == 0 and node.module and node.module.split(".")[0] == "npcalls":
                parts = node.module.split(".")
                out.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names
                       if a.name.startswith("npcalls."))
    return out


@pytest.mark.parametrize("module", sorted(LAYER_OF))
def test_core_modules_import_only_lower_layers(module):
    deps = _runtime_imports(PKG / f"{module}.py")
    outside = sorted(d for d in deps if d not in LAYER_OF)
    assert not outside, f"{module} imports {outside}, which are not core modules"
    upward = sorted(d for d in deps if LAYER_OF[d] >= LAYER_OF[module])
    assert not upward, (f"{module} (layer {LAYER_OF[module]}) imports {upward} of its own "
                        "layer or above")


def test_the_check_sees_imports_inside_functions_and_skips_typing_blocks(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("from typing import TYPE_CHECKING\n"
                   "from . import layout\n"
                   "if TYPE_CHECKING:\n    from .table import CallTable\n"
                   "def f():\n    from .display import table_html\n"
                   "import npcalls.analysis\n")
    assert _runtime_imports(src) == {"layout", "display", "analysis"}


def test_every_core_module_has_a_layer():
    core = {"errors", "crashpoints", "hashing", "buckets", "files", "layout", "keys", "locking",
            "timestamps", "storage", "readlock", "protocol", "probe", "batching", "scan",
            "lifecycle", "maintenance", "single", "many", "display", "table"}
    assert core == set(LAYER_OF)
    for m in core:
        assert (PKG / f"{m}.py").is_file(), m
