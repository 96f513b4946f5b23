"""A second CPU for the per-row work of ingest (JSONL) and prep: one part of the rows is computed
in a forked child while this process computes the rest; the child's result comes back pickled, in
shared memory or through a pipe (prep's near-dup sketch arrays are written to shared memory
directly, ingest's rows to files).

Only pure functions of data the parent already holds run in the child (normalisation, PII search,
quality, sketches; parsing and mapping lines into a plain file); the child never logs, never
touches the bus or the event loop, and leaves with ``os._exit``. Anything that goes wrong in the
child (an exception, a crash, a kill) is not an error: :meth:`Forked.result` returns ``None`` and
the caller computes that part itself, so results never depend on whether a child ran.

``TUNELINE_WORKERS=1`` turns it off and ``2`` on; by default it is on where 2+ CPUs are usable,
unless the 1-minute load average says they are clearly busy with other work already (then the two
processes would only take turns, at some cost: ~10% slower than one on the JIRA rows); a platform
without ``fork`` never uses it. (Ingest uses it too: it belongs in services/common.)
"""

from __future__ import annotations

import mmap
import os
import pickle
import signal
import struct
from collections.abc import Callable
from typing import Any

_HEADER = struct.Struct("<BQ")  # (in shared memory?, size) of the pickled result


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def workers() -> int:
    """How many processes the per-row work may use (1 or 2)."""
    if not hasattr(os, "fork"):
        return 1
    env = os.environ.get("TUNELINE_WORKERS", "").strip()
    if env:
        try:
            return 2 if int(env) >= 2 else 1
        except ValueError:
            return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    if cpus < 2:
        return 1
    try:  # CPUs clearly busy with other work (this process counts for about one): a second
        load = os.getloadavg()[0]  # process would only take turns with it, at some cost
    except (AttributeError, OSError):
        load = 0.0
    return 2 if load < cpus + 0.5 else 1


class Forked:
    """``fn(*args)`` running in a forked child; :meth:`result` collects it (or ``None``).

    With ``result_bytes``, the child pickles its result straight into that much shared memory (only
    the pages it writes are ever allocated) and the parent unpickles it from there: no copy through
    the pipe, which then only says where the result is. A larger result goes through the pipe."""

    def __init__(self, fn: Callable[..., Any], *args: Any, result_bytes: int = 0) -> None:
        self.pid = 0
        self._fd = -1
        self._shm = mmap.mmap(-1, result_bytes) if result_bytes > 0 else None
        r, w = os.pipe()
        try:
            pid = os.fork()
        except OSError:
            os.close(r)
            os.close(w)
            return
        if pid == 0:  # the child: compute, send, leave without running any of the parent's cleanup
            try:
                os.close(r)
                self._send(w, fn, args)
            finally:
                os._exit(0)
        os.close(w)
        self.pid, self._fd = pid, r

    def _send(self, w: int, fn: Callable[..., Any], args: tuple) -> None:
        try:
            result = (True, fn(*args))
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, which recomputes
            result = (False, f"{type(exc).__name__}: {exc}")
        if self._shm is not None:
            try:
                self._shm.seek(0)
                pickle.dump(result, self._shm, protocol=pickle.HIGHEST_PROTOCOL)
                _write_all(w, _HEADER.pack(1, self._shm.tell()))
                return
            except ValueError:  # larger than the shared memory
                pass
        payload = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
        _write_all(w, _HEADER.pack(0, len(payload)))
        _write_all(w, payload)

    def result(self) -> Any:
        """The child's return value, or ``None`` when it failed (the caller then computes it)."""
        if not self.pid:
            return None
        try:
            with os.fdopen(self._fd, "rb", buffering=0) as f:
                self._fd = -1
                head = f.read(_HEADER.size)
                if len(head) != _HEADER.size:
                    return None  # the child died before answering
                shared, size = _HEADER.unpack(head)
                if shared:
                    buf = memoryview(self._shm)[:size]
                else:
                    buf = bytearray(size)
                    view, got = memoryview(buf), 0
                    while got < size:
                        n = f.readinto(view[got:])
                        if not n:
                            return None  # killed mid-write
                        got += n
            try:
                os.waitpid(self.pid, 0)  # it has sent everything and is leaving
            except ChildProcessError:  # reaped by someone else's SIGCHLD handling
                pass
            self.pid = 0
            try:
                ok, value = pickle.loads(buf)
            except Exception:  # noqa: BLE001 - cannot happen short of a bug; recomputed by the caller
                return None
            finally:
                if isinstance(buf, memoryview):
                    buf.release()
        finally:
            self.close()
        return value if ok else None

    def close(self) -> None:
        """Reap the child (killing it first if it is still running)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self.pid:
            try:
                if os.waitpid(self.pid, os.WNOHANG) == (0, 0):
                    os.kill(self.pid, signal.SIGKILL)
                    os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass
            self.pid = 0
        if self._shm is not None:
            self._shm.close()
            self._shm = None


def split_run(fn: Callable[[Any], Any], mine: Any, theirs: Any, parallel: bool, result_bytes: int = 0
              ) -> tuple[Any, Any]:
    """``(fn(mine), fn(theirs))``, the second computed in a forked child when ``parallel``."""
    child = Forked(fn, theirs, result_bytes=result_bytes) if parallel else None
    try:
        a = fn(mine)
        b = child.result() if child is not None else None
    finally:
        if child is not None:
            child.close()
    if b is None:
        b = fn(theirs)
    return a, b
