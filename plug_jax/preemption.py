"""Turns a stop signal into a step at which every process stops, saves and exits 0."""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


def _preemption_service_active() -> bool:
    """Whether JAX's coordination service watches SIGTERM for us (jax.distributed + service)."""
    return bool(jax.distributed.is_initialized() and jax.config.jax_enable_preemption_service)


class PreemptionGuard:
    """Turns a stop signal into a step at which every process stops, saves and exits 0.

        with PreemptionGuard() as guard:
            for step in ...:
                ...
                if guard.should_stop(step): save(force=True); wait(); break

    The handler only sets a flag. `should_stop(step)` must be called by every process at every
    step: under `jax.distributed` with the preemption service, JAX's coordination service owns
    SIGTERM (its handler is left in place) and `reached_preemption_sync_point` names the step;
    otherwise the local flags are all-gathered every `sync_every` steps, so all processes agree.
    A second SIGINT raises KeyboardInterrupt at once.
    """

    def __init__(self, *, sigint: bool = False, sync_every: int = 1):
        self.sync_every = max(1, int(sync_every))
        self._signals = [signal.SIGTERM] + ([signal.SIGINT] if sigint else [])
        self._previous: dict[int, Any] = {}
        self._received: int | None = None
        self._use_service = False
        self.stop_step: int | None = None

    @property
    def received(self) -> int | None:
        """The signal number this process received, if any."""
        return self._received

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """What the handler does: ask for a stop at the next agreed step."""
        self._received = signum

    def _handle(self, signum, frame) -> None:
        del frame
        if signum == signal.SIGINT and self._received == signal.SIGINT:
            raise KeyboardInterrupt
        self._received = signum  # no printing here: the handler may interrupt a print

    def __enter__(self) -> "PreemptionGuard":
        self._use_service = _preemption_service_active()
        for signum in self._signals:
            if signum == signal.SIGTERM and self._use_service:
                continue  # replacing it would blind the coordination service
            self._install(signum)
        return self

    def _install(self, signum: int) -> None:
        if threading.current_thread() is not threading.main_thread():
            logging.warning("PreemptionGuard outside the main thread: no handler for %s",
                            signal.Signals(signum).name)
        elif signum not in self._previous:
            self._previous[signum] = signal.signal(signum, self._handle)

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def should_stop(self, step: int) -> bool:
        """True at the step where all processes stop (and at every later call)."""
        if self.stop_step is not None:
            return True
        stop = False
        if self._use_service:
            try:
                stop = multihost_utils.reached_preemption_sync_point(int(step))
            except RuntimeError:  # the service is off after all: catch SIGTERM ourselves
                self._use_service = False
                self._install(signal.SIGTERM)
        if jax.process_count() > 1:
            if step % self.sync_every == 0:
                flags = multihost_utils.process_allgather(
                    np.array([self._received is not None], np.int32))
                stop = stop or bool(np.asarray(flags).any())
        else:
            stop = stop or self._received is not None
        if stop:
            self.stop_step = int(step)
            reason = (signal.Signals(self._received).name if self._received is not None
                      else "preemption sync point" if self._use_service
                      else "a signal to another process")
            logging.warning("stopping at step %d (%s)", step, reason)
        return stop
