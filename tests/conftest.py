"""Shared fixtures. Real-data tests read ../shared/data: they skip when it is absent, unless
MBSSL_REQUIRE_DATA=1 (set by .ci/run), which turns the skip into a failure. Tests that need
the ``torchrun`` script skip without it unless MBSSL_REQUIRE_TORCHRUN=1 (also set by .ci/run).
The terminal summary ends with a line counting the real-data tests that were skipped, so a
plain ``pytest`` run never hides them."""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MBSSL_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _no_logging_handler_outlives_its_test():
    """A command called in-process configures the root logger as for its own process
    (``logging.basicConfig(force=True)`` in the trainer: a stderr handler bound to the stream of
    that moment, pytest's capture). Left behind, that handler writes the next tests' records to
    a closed capture stream ("--- Logging error ---" in their stderr). Remove what the test
    added (pytest's own capture handlers are managed by pytest) and restore the level."""
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in before and type(h) is logging.StreamHandler:
            root.removeHandler(h)
    root.setLevel(level)


def require_data(path: Path = SHARED_DATA) -> Path:
    """Return ``path`` if it exists; otherwise skip (or fail under MBSSL_REQUIRE_DATA=1)."""
    if path.exists():
        return path
    msg = f"real data not found at {path}"
    if os.environ.get("MBSSL_REQUIRE_DATA") == "1":
        pytest.fail(msg + " (MBSSL_REQUIRE_DATA=1 forbids skipping)")
    pytest.skip(msg)


def require_torchrun() -> str:
    """Path of the ``torchrun`` script beside this Python; skip (or fail under
    MBSSL_REQUIRE_TORCHRUN=1) when it is missing."""
    path = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if path:
        return path
    msg = f"torchrun not installed beside {sys.executable}"
    if os.environ.get("MBSSL_REQUIRE_TORCHRUN") == "1":
        pytest.fail(msg + " (MBSSL_REQUIRE_TORCHRUN=1 forbids skipping)")
    pytest.skip(msg)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return require_data()


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


def _is_real_data_skip(report) -> bool:
    """A skipped test that is marked ``realdata`` or skipped for lack of the shared data."""
    if "realdata" in getattr(report, "keywords", {}):
        return True
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return str(SHARED_DATA) in reason or "real data" in reason


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if _is_real_data_skip(r)]
    if skipped:
        terminalreporter.write_line(
            f"{len(skipped)} real-data test(s) SKIPPED: {SHARED_DATA} (or a file in it) is missing; "
            f"set MBSSL_REQUIRE_DATA=1 to make that a failure")
    else:
        terminalreporter.write_line(f"real-data tests: none skipped (data at {SHARED_DATA})")
