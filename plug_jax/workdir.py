"""A run's directory: a local path, a shared file system or a bucket (`gs://...`), as etils'
`epath` and Orbax accept it.

- Every file a run writes is written whole or not at all (`write_text`, `write_bytes`,
  `open_atomic`: a temporary sibling, then a rename), so a kill at any moment leaves the last
  complete version.
- `Lock` keeps two runs off one workdir: a lock file holding the host and pid of its owner,
  refreshed every minute; a lock whose owner is dead (same host: no such process; another host:
  not refreshed for 10 minutes, say a preempted slice) is taken over.
- `check_shared` refuses a multi-process run whose processes do not see the same directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from typing import IO, Iterator

from absl import logging
from etils import epath

LOCK_FILE = "run.lock"


class WorkdirError(RuntimeError):
    """The workdir cannot be used by this run (busy, or not shared by its processes)."""


def path(directory: epath.PathLike) -> epath.Path:
    return epath.Path(directory)


def is_local(location: epath.PathLike) -> bool:
    return "://" not in os.fspath(location)


def _temporary_sibling(target: epath.Path) -> epath.Path:
    return target.parent / f".{target.name}.{socket.gethostname()}.{os.getpid()}.tmp"


@contextlib.contextmanager
def open_atomic(target: epath.PathLike, mode: str = "w") -> Iterator[IO]:
    """A file object whose content replaces `target` on a clean exit, and never otherwise."""
    target = path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_sibling(target)
    try:
        with temporary.open(mode) as file:
            yield file
        temporary.replace(target)
    finally:
        if temporary.exists():
            temporary.unlink()


def write_text(target: epath.PathLike, text: str) -> epath.Path:
    with open_atomic(target, "w") as file:
        file.write(text)
    return path(target)


def write_bytes(target: epath.PathLike, data: bytes) -> epath.Path:
    with open_atomic(target, "wb") as file:
        file.write(data)
    return path(target)


def write_json(target: epath.PathLike, value, **kwargs) -> epath.Path:
    return write_text(target, json.dumps(value, **kwargs) + "\n")


# ------------------------------------------------------------------------------------ the lock

def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class Lock:
    """`<workdir>/run.lock`, holding {"host", "pid", "since", "updated"} of the run that owns the
    workdir; a thread rewrites "updated" every `refresh_s` while it is held.

    `acquire` raises WorkdirError while another live process holds it. A lock left by a process
    that died on this host (SIGKILL, a crash) is stale and taken over at once; one from another
    host, whose process cannot be checked from here, once it is `stale_after_s` old.
    """

    def __init__(self, directory: epath.PathLike, *, refresh_s: float = 60,
                 stale_after_s: float = 600):
        self.file = path(directory) / LOCK_FILE
        now = time.time()
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "since": now,
                      "updated": now}
        self.refresh_s, self.stale_after_s = refresh_s, stale_after_s
        self.held = False
        self._stopped = threading.Event()
        self._refresher: threading.Thread | None = None

    def holder(self) -> dict | None:
        try:
            return json.loads(self.file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None  # gone, or half-written by a run killed in between: free

    def _mine(self, holder: dict | None) -> bool:
        return holder is not None and (holder.get("host"), holder.get("pid")) == (
            self.owner["host"], self.owner["pid"])

    def _stale(self, holder: dict) -> bool:
        if holder["host"] == self.owner["host"]:
            return not _process_alive(int(holder["pid"]))
        return time.time() - holder.get("updated", holder["since"]) > self.stale_after_s

    def acquire(self) -> "Lock":
        self.file.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                self.held = True
                self._refresher = threading.Thread(target=self._refresh, daemon=True,
                                                   name="plug_jax.workdir.Lock")
                self._refresher.start()
                return self
            holder = self.holder()
            if holder is None or self._stale(holder):
                self._remove_stale()
                continue
            raise WorkdirError(
                f"{self.file.parent} is in use by pid {holder['pid']} on {holder['host']} "
                f"(lock file {self.file}); wait for that run, or delete the lock file if it is "
                f"dead (a lock from another host expires {self.stale_after_s / 60:g} minutes "
                "after its last refresh)")
        raise WorkdirError(f"{self.file}: could not take the lock (other runs keep taking it)")

    def _create(self) -> bool:
        """Creates the lock file with its content in one step; False if it exists."""
        content = json.dumps(self.owner)
        if not is_local(self.file):  # an object store: no exclusive create; check, then write
            if self.file.exists():
                return False
            write_text(self.file, content)
            return True
        temporary = _temporary_sibling(self.file)
        temporary.write_text(content)
        try:
            os.link(temporary, self.file)  # fails if the file exists: exclusive, and whole
            return True
        except FileExistsError:
            return False
        finally:
            temporary.unlink()

    def _remove_stale(self) -> None:
        if not is_local(self.file):
            self.file.unlink(missing_ok=True)
            return
        # A rename only one of several runs taking over the same stale lock can win.
        aside = self.file.parent / f".{LOCK_FILE}.stale.{uuid.uuid4().hex}"
        with contextlib.suppress(FileNotFoundError):
            os.rename(self.file, aside)
            os.unlink(aside)

    def _refresh(self) -> None:
        while not self._stopped.wait(self.refresh_s):
            try:
                if not self._mine(self.holder()):
                    return  # taken over: not ours to rewrite
                self.owner["updated"] = time.time()
                write_text(self.file, json.dumps(self.owner))
            except OSError as error:  # a storage hiccup: the next refresh may do
                logging.warning("could not refresh %s: %s", self.file, error)

    def release(self) -> None:
        self._stopped.set()
        if self._refresher is not None:
            self._refresher.join()
        if self.held and self._mine(self.holder()):
            self.file.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> "Lock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def hold(directory: epath.PathLike) -> Iterator[None]:
    """The workdir's `Lock`, taken by process 0 for the whole run; every process raises
    WorkdirError when it is held by another run. A collective: every process enters it."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    lock, error = Lock(directory), None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except WorkdirError as refused:
            error = refused
    if jax.process_count() > 1:
        refused = int(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
        if refused and error is None:
            error = WorkdirError(f"{lock.file.parent} is in use by another run (see process 0)")
    if error is not None:
        raise error
    try:
        yield
    finally:
        lock.release()


# ------------------------------------------------------------------------------- appended logs

class JsonLines:
    """A JSON-lines file that grows by whole lines: each `append` rewrites it atomically (an
    object store has no append, and a kill mid-append would leave half a line)."""

    def __init__(self, target: epath.PathLike):
        self.path = path(target)
        self.lines = self.path.read_text().splitlines() if self.path.exists() else []

    def append(self, record: dict) -> None:
        self.lines.append(json.dumps(record))
        write_text(self.path, "\n".join(self.lines) + "\n")


# --------------------------------------------------------------------------- shared across hosts

def check_shared(directory: epath.PathLike) -> None:
    """In a multi-process run, WorkdirError on every process unless all see `directory` as one:
    process 0 writes a marker, and after a barrier every process must read it back. A collective:
    every process calls it."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return
    directory = path(directory)
    token = int(multihost_utils.broadcast_one_to_all(
        np.int32(uuid.uuid4().int % 2**31) if jax.process_index() == 0 else np.int32(0)))
    marker = directory / f".shared_check.{token}"
    if jax.process_index() == 0:
        write_text(marker, str(token))
    multihost_utils.sync_global_devices("plug_jax.workdir.check_shared")
    seen = marker.exists() and marker.read_text() == str(token)
    every = np.asarray(multihost_utils.process_allgather(np.array([seen], np.int32))).reshape(-1)
    multihost_utils.sync_global_devices("plug_jax.workdir.check_shared.read")
    if jax.process_index() == 0:
        marker.unlink(missing_ok=True)
    if not every.all():
        blind = [int(i) for i in np.flatnonzero(every == 0)]
        raise WorkdirError(
            f"workdir {directory} is not shared by the run's processes: process(es) {blind} do "
            "not see what process 0 writes there; use a shared file system or a gs:// bucket")
