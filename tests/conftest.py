"""Shared fixtures. Real-data tests read ../shared/data: they skip when it is absent, unless
MBSSL_REQUIRE_DATA=1 (set by .ci/run), which turns the skip into a failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MBSSL_SHARED_DATA", REPO.parent / "shared" / "data"))


def require_data(path: Path = SHARED_DATA) -> Path:
    """Return ``path`` if it exists; otherwise skip (or fail under MBSSL_REQUIRE_DATA=1)."""
    if path.exists():
        return path
    msg = f"real data not found at {path}"
    if os.environ.get("MBSSL_REQUIRE_DATA") == "1":
        pytest.fail(msg + " (MBSSL_REQUIRE_DATA=1 forbids skipping)")
    pytest.skip(msg)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return require_data()


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
