"""Shared fixtures. Tests that need the reference data in `../shared/golden` skip (with the reason) without it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("LXMERT_PL_SHARED", REPO_ROOT.parent / "shared"))
GOLDEN_DIR = SHARED_DIR / "golden"


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
