"""Shared fixtures: the reference vectors made by the authors' implementation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(os.environ.get("METASEP_REFERENCE_DIR", REPO.parent / "shared" / "reference"))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"reference vectors not found at {REFERENCE_DIR} (set METASEP_REFERENCE_DIR)")
    return REFERENCE_DIR
