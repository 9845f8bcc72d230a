"""One way to take over SIGTERM / SIGINT for a block and give them back, shared by the trainer
and the experiment runner (each keeps its own handler: the trainer records itself KILLED, the
runner stops its training child first)."""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType

Handler = Callable[[int, FrameType | None], None]
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class HandleStopSignals:
    """Installs ``handler`` for SIGTERM and SIGINT inside the ``with`` block, then restores the
    previous handlers.

    ``keep_ignored_sigint``: leave a SIGINT the process inherited ignored (a shell's ``cmd &``)
    ignored, as Python itself does. A previous handler installed from C reads back as None,
    which ``signal.signal`` refuses; it is restored as SIG_DFL."""

    def __init__(self, handler: Handler, *, keep_ignored_sigint: bool = False) -> None:
        self.handler = handler
        self.keep_ignored_sigint = keep_ignored_sigint
        self.old: dict[int, signal.Handlers | Handler] = {}

    def __enter__(self) -> HandleStopSignals:
        for sig in STOP_SIGNALS:
            if self.keep_ignored_sigint and sig == signal.SIGINT and signal.getsignal(sig) is signal.SIG_IGN:
                continue
            prev = signal.signal(sig, self.handler)
            self.old[sig] = signal.SIG_DFL if prev is None else prev
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, h in self.old.items():
            signal.signal(sig, h)
        self.old.clear()
