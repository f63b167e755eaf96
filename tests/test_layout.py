"""The house rules (ARCHITECTURE.md): one-way imports, no private cross-module names, size limits."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import check_layout  # noqa: E402


def test_import_graph_runs_one_way_and_files_stay_small():
    assert check_layout.check() == []


def test_the_checker_flags_an_upward_import_and_a_private_name(tmp_path, monkeypatch):
    pkg = tmp_path / "trim_select"
    (pkg / "training").mkdir(parents=True)
    (pkg / "config.py").write_text("from .selector import TrimSelector\nfrom .io import _hidden\n")
    (pkg / "io.py").write_text("_hidden = 1\n")
    (pkg / "selector.py").write_text("TrimSelector = object\n")
    (pkg / "training" / "__init__.py").write_text("from ..warmup import x\n")
    (pkg / "warmup.py").write_text("from .training import y\nx = 1\n")
    monkeypatch.setattr(check_layout, "ROOT", pkg)
    found = "\n".join(check_layout.check())
    assert "config (ground) imports selector (selector), a room above it" in found
    assert "imports private name _hidden of io" in found
    assert "import cycle" in found


@pytest.mark.parametrize("module", ["trim_select.training.checkpoints", "trim_select.training.lora",
                                    "trim_select.engines.base", "trim_select.selector",
                                    "trim_select.engines.dispatch", "trim_select.pipeline",
                                    "trim_select.outputs", "trim_select.baselines"])
def test_each_room_imports_alone_in_a_fresh_interpreter(module):
    code = f"import importlib; importlib.import_module({module!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert importlib.util.find_spec(module) is not None
