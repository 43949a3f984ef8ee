"""A thread that does one step every few seconds until the one who started it stops it.

The jobs' background work (a manifest's timed flush, a lease's heartbeat, a worker call's
heartbeat, the driver's watchdog, the bench's memory sampler) is each a :class:`Periodic` used as
a context: leaving the block stops the thread and waits for it, so no such thread outlives its
owner or is left to the garbage collector.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Periodic:
    """Runs ``step()`` every ``interval`` seconds in a thread named ``name``, from
    :meth:`start` (or entering the context) until :meth:`stop` (or leaving it). A step that
    raises is logged and the next one runs on time; a step that returns ``False`` ends the loop."""

    def __init__(self, interval: float, step: Callable[[], object], name: str) -> None:
        self.interval, self._step = interval, step
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"metasep-{name}", daemon=True)

    def start(self) -> Periodic:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the loop and wait for a step in progress to end."""
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join()

    def __enter__(self) -> Periodic:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stopped.wait(self.interval):
            try:
                if self._step() is False:
                    return
            except Exception as error:
                log.warning("%s: %s", self._thread.name, error)
