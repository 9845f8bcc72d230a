"""The shared SIGTERM / SIGINT guard of the trainer and the experiment runner."""

import os
import signal

import pytest

from mbssl_dist.utils.signals import HandleStopSignals


class Caught(Exception):
    pass


def _raise(signum, _frame):
    raise Caught(signum)


@pytest.fixture
def saved_handlers():
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, h in old.items():
        signal.signal(s, h)


def test_handler_inside_the_block_previous_one_after(saved_handlers):
    def mine(*_):
        pass

    signal.signal(signal.SIGTERM, mine)
    before_int = signal.getsignal(signal.SIGINT)
    with HandleStopSignals(_raise):
        with pytest.raises(Caught):
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is mine
    assert signal.getsignal(signal.SIGINT) is before_int


def test_handlers_are_restored_when_an_exception_leaves_the_block(saved_handlers):
    """The trainer relies on this: its loop returns or raises from inside the block."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with pytest.raises(ZeroDivisionError):
        with HandleStopSignals(_raise):
            assert signal.getsignal(signal.SIGTERM) is _raise
            1 / 0
    assert {s: signal.getsignal(s) for s in before} == before


def test_an_inherited_ignored_sigint_is_kept_only_when_asked(saved_handlers):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with HandleStopSignals(_raise, keep_ignored_sigint=True):
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is _raise
    with HandleStopSignals(_raise):  # the trainer: Ctrl-C must record the run KILLED
        assert signal.getsignal(signal.SIGINT) is _raise
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_a_previous_handler_installed_from_c_is_restored_as_default(saved_handlers, monkeypatch):
    """``signal.signal`` returns None for a handler Python did not install (an embedding
    program's) and refuses None back; the guard restores SIG_DFL instead of raising TypeError."""
    real = signal.signal
    restored = []

    def from_c(sig, handler):
        prev = real(sig, handler)
        if handler is _raise:
            return None  # what Python reports for a C-level handler
        restored.append((sig, handler))
        return prev

    monkeypatch.setattr(signal, "signal", from_c)
    with HandleStopSignals(_raise):
        pass
    assert sorted(restored) == [(signal.SIGINT, signal.SIG_DFL), (signal.SIGTERM, signal.SIG_DFL)]
