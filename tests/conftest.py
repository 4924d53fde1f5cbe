"""Shared fixtures. Tests that need the reference data in `../shared/golden` skip (with the reason) without it."""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("LXMERT_PL_SHARED", REPO_ROOT.parent / "shared"))
GOLDEN_DIR = SHARED_DIR / "golden"
# Labels never reach for the network in tests (nor in the entry points they start): no VG vocabulary download.
os.environ.setdefault("LXMERT_PL_NO_VOCAB_DOWNLOAD", "1")


@pytest.fixture(autouse=True)
def ctrl_c_raises_keyboard_interrupt():
    """Every test starts with Python's own SIGINT handler. A pytest started as a background job (`cmd &` in a
    script) inherits an ignored SIGINT, and Lightning ignores SIGINT after a KeyboardInterrupt it handled in this
    process; the processes a test starts inherit "ignored", and the Ctrl-C tests could not pass."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield


def load_script(path: Path, name: str | None = None) -> ModuleType:
    """Import a script of the repository (an entry point such as `extract.py`, a bench or data script) as a module,
    registered in `sys.modules` (dataclasses defined in a script need that), under `name` or its file stem."""
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def golden_path(*parts: str) -> Path:
    """Path inside ../shared/golden, or skip the calling test when it is absent."""
    path = GOLDEN_DIR.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"reference data not found: {path} (only developers and CI have ../shared/golden)")
    return path


@pytest.fixture
def lxrt_golden() -> Path:
    return golden_path("lxrt")


@pytest.fixture
def frcnn_golden() -> Path:
    return golden_path("frcnn")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny detector networks: their ops are too small to gain from a second thread, and on a busy machine each
    thread hand-off can stall for milliseconds. Restored after the module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
