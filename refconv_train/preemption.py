"""SIGTERM / SIGINT as a request to stop after the current step (preemption, Ctrl-C), not as an abort."""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("refconv_train")


class StopOnSignal:
    """``with StopOnSignal() as stop: ... if stop.requested: ...``. A second SIGINT aborts at once. Outside the
    main thread (where Python delivers signals) nothing is installed; the caller's handlers return on exit."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict = {}

    def _request(self, signum, frame) -> None:
        self.requested = True
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        log.warning("%s received: stopping after the current step", signal.Signals(signum).name)

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._request) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
