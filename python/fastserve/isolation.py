"""Process-isolated instances (``[instance_group] isolation = "process"``).

Each instance's model lives in a worker process of its own (``python -m fastserve.worker``, same
interpreter and environment), so N instances of a GIL-bound model use N cores and a model that
crashes (a segfault, ``os._exit``, the OOM killer) takes only its own batch down. The Rust
scheduler drives a :class:`ProcessInstance` exactly like an in-process model: ``execute`` writes
the batch's tensors once into a shared-memory buffer (a memfd mapped by both processes), sends a
small control message over a ``SOCK_SEQPACKET`` socket pair and waits for the reply in a blocking
``recv``, which releases the GIL; the worker's outputs come back the same way and are copied once
out of its buffer. Tensor data never goes through the socket; BYTES tensors travel as
length-prefixed elements.

The protocol (JSON arrays, one per message, never carrying tensor data; nothing is unpickled):

- parent → worker: ``("init", nbytes)`` with the input buffer's fd (the JSON load spec is in
  it), ``("run", layout, size)`` (a new input buffer's fd attached when it grew), ``("stop",)``.
- worker → parent: ``("ready", interface)``, ``("ok", layout, size)`` (a new output buffer's fd
  attached when it grew), ``("error", type name, message)`` (the model raised; the worker lives
  on), ``("stopped",)``.
"""

from __future__ import annotations

import atexit
import builtins
import json
import logging
import mmap
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import weakref
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .logs import model_fields

if TYPE_CHECKING:
    from .backends import LoadContext, LoadedModel

log = logging.getLogger("fastserve.isolation")

ISOLATION_PROCESS = "process"
# The largest control message: a layout or an error message (longer messages are cut).
MAX_MESSAGE = 64 * 1024
MAX_ERROR_CHARS = 8 * 1024
ALIGN = 64  # each tensor starts on a cache line of the shared buffer
MIN_BUFFER = 1 << 20
# Restart backoff after consecutive worker exits: none for the first, then doubling up to the cap.
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 2.0
# How long a stopping worker may take to run finalize() before it is killed.
FINALIZE_TIMEOUT_S = 10.0
# How often the worker's resident memory is read (after a batch) for the metrics.
RSS_EVERY_S = 1.0
BYTES = "bytes"  # the layout's dtype of a BYTES tensor

Layout = list[tuple[str, str, tuple[int, ...], int, int]]  # name, dtype, shape, offset, nbytes


class InstanceProcessExited(RuntimeError):
    """The worker process of an instance exited while it ran a batch (the batch fails; the next
    one gets a restarted worker)."""


class InstanceUnavailable(RuntimeError):
    """An instance whose worker kept exiting: it serves no more until the version is reloaded."""


def exit_description(returncode: int) -> str:
    """``"exited with signal 11 (SIGSEGV)"`` or ``"exited with status 3"``, as users read it."""
    if returncode < 0:
        try:
            name = f" ({signal.Signals(-returncode).name})"
        except ValueError:
            name = ""
        return f"model instance process exited with signal {-returncode}{name}"
    return f"model instance process exited with status {returncode}"


class SharedBuffer:
    """Memory both processes map: a memfd (no file system name to clean up; it lives while either
    side holds its fd or mapping)."""

    def __init__(self, size: int, fd: int | None = None) -> None:
        if fd is None:
            fd = os.memfd_create("fastserve-tensors", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
        self.fd = fd
        self.size = size
        self.map = mmap.mmap(fd, size)

    @staticmethod
    def sized(needed: int, current: int = 0) -> int:
        """The size to create for ``needed`` bytes: at least double the current one, so a
        growing workload remaps only a few times."""
        size = max(MIN_BUFFER, needed, 2 * current)
        return (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE

    def close(self) -> None:
        try:
            self.map.close()
        except BufferError:
            pass  # a model kept a view of an old input: the mapping goes when that view does
        os.close(self.fd)


def _serialize_bytes(array: np.ndarray) -> bytes:
    """A BYTES tensor's elements, each as a 4-byte little-endian length and its bytes (Triton's
    wire form); ``str`` elements are UTF-8."""
    parts: list[bytes] = []
    for item in array.reshape(-1):
        b = item if isinstance(item, bytes) else str(item).encode()
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


def _deserialize_bytes(data: memoryview, shape: tuple[int, ...]) -> np.ndarray:
    count = int(np.prod(shape, dtype=np.int64))
    out = np.empty(count, dtype=object)
    pos = 0
    for i in range(count):
        (n,) = struct.unpack_from("<I", data, pos)
        out[i] = bytes(data[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return out.reshape(shape)


def plan(arrays: dict[str, Any]) -> tuple[list[tuple[str, np.ndarray | bytes]], int]:
    """What each tensor writes (an array, or a BYTES tensor's serialized elements) and the bytes
    the buffer needs for all of them."""
    items: list[tuple[str, np.ndarray | bytes]] = []
    total = 0
    for name, value in arrays.items():
        array = np.asarray(value)
        data: np.ndarray | bytes = _serialize_bytes(array) if array.dtype.kind in "OUS" else array
        items.append((name, data if isinstance(data, bytes) else array))
        total += -total % ALIGN + (len(data) if isinstance(data, bytes) else array.nbytes)
    return items, total


def write(buffer: SharedBuffer, items: list[tuple[str, np.ndarray | bytes]], shapes: dict[str, Any]) -> Layout:
    """Copies each tensor once into ``buffer`` and returns where each one is."""
    layout: Layout = []
    offset = 0
    for name, data in items:
        offset += -offset % ALIGN
        if isinstance(data, bytes):
            buffer.map[offset : offset + len(data)] = data
            layout.append((name, BYTES, tuple(np.shape(shapes[name])), offset, len(data)))
            offset += len(data)
        else:
            target = np.ndarray(data.shape, data.dtype, buffer=buffer.map, offset=offset)
            np.copyto(target, data, casting="no")
            del target
            layout.append((name, data.dtype.str, data.shape, offset, data.nbytes))
            offset += data.nbytes
    return layout


def read(buffer: SharedBuffer, layout: Layout, copy: bool) -> dict[str, np.ndarray]:
    """The tensors of ``layout``: read-only views of the buffer, or (``copy``) arrays of their own
    that outlive the buffer's next use."""
    out: dict[str, np.ndarray] = {}
    for name, dtype, shape, offset, nbytes in layout:
        if dtype == BYTES:
            out[name] = _deserialize_bytes(memoryview(buffer.map)[offset : offset + nbytes], shape)
            continue
        view = np.ndarray(shape, np.dtype(dtype), buffer=buffer.map, offset=offset)
        if copy:
            out[name] = view.copy()
        else:
            view.flags.writeable = False
            out[name] = view
    return out


def send(sock: socket.socket, message: tuple[Any, ...], fds: Iterable[int] = ()) -> None:
    data = json.dumps(message).encode()
    fds = list(fds)
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.sendall(data)


def receive(sock: socket.socket) -> tuple[tuple[Any, ...], list[int]] | None:
    """The next message and any fds it carries; None when the other side is gone."""
    try:
        data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, 4)
    except (ConnectionResetError, BrokenPipeError):
        return None
    if not data:
        for fd in fds:
            os.close(fd)
        return None
    return tuple(json.loads(data)), fds


def remote_error(type_name: str, message: str) -> Exception:
    """The exception a model raised in its worker, as the same builtin type when there is one (so
    clients read the same error as with in-process instances)."""
    kind = getattr(builtins, type_name, None)
    if isinstance(kind, type) and issubclass(kind, Exception):
        try:
            return kind(message)
        except Exception:
            pass
    return RuntimeError(f"{type_name}: {message}")


# Workers are started from this one long-lived thread: PR_SET_PDEATHSIG fires when the *thread*
# that started a child ends, so a worker started from a short-lived loader thread would be killed
# with it.
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastserve-spawn")
_LIVE: weakref.WeakSet[ProcessInstance] = weakref.WeakSet()


def _spawn(fd: int) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "fastserve.worker", str(fd), str(os.getpid())]
    # close_fds: the worker inherits only its socket, never a listening socket or another
    # worker's descriptors. stdout/stderr stay the server's, so a model's prints and tracebacks
    # land in its log.
    return subprocess.Popen(argv, pass_fds=(fd,), close_fds=True, stdin=subprocess.DEVNULL)


@dataclass
class _Worker:
    proc: subprocess.Popen[bytes]
    sock: socket.socket
    inputs: SharedBuffer
    outputs: SharedBuffer | None = None

    def close(self) -> None:
        self.sock.close()
        self.inputs.close()
        if self.outputs is not None:
            self.outputs.close()


class ProcessInstance:
    """One model instance in its own worker process, driven like an in-process model.

    ``spec`` is what the worker loads (see ``fastserve.worker.load``): a repository version (its
    config and placement) or a model class importable by name. A worker that exits fails only the batch it
    ran; the next batch starts a new one (after a backoff once it failed more than once in a row),
    and after ``max_failures`` exits in a row the instance reports itself unavailable, which marks
    the version unavailable. ``fastserve_kill`` (the watchdog, at ``execution_timeout_ms``) kills
    the worker; ``fastserve_report`` tells the core its restarts and memory after each batch."""

    def __init__(self, name: str, version: int, seat: int, spec: dict[str, Any], max_failures: int) -> None:
        self.label = f"model '{name}' version {version} instance {seat}"
        self._log_fields = model_fields(name, version)
        self._spec = json.dumps({**spec, "sys_path": list(sys.path)}, default=str).encode()
        self._max_failures = max_failures
        self._failures = 0
        self._unreported_restarts = 0
        self._unavailable: str | None = None
        self._killed = False
        self._rss: int | None = None
        self._rss_at = 0.0
        self._worker: _Worker | None = None
        self.interface: tuple[str, int, list[Any], list[Any]] = self._start()
        _LIVE.add(self)

    @property
    def pid(self) -> int | None:
        """The worker's process id, while one runs."""
        return self._worker.proc.pid if self._worker is not None else None

    def _start(self) -> Any:
        """Starts a worker and loads the model there; raises ``LoadError`` with the worker's
        reason when it cannot."""
        from .backends import LoadError

        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = _SPAWNER.submit(_spawn, child.fileno()).result()
        finally:
            child.close()
        buffer = SharedBuffer(SharedBuffer.sized(len(self._spec)))
        buffer.map[: len(self._spec)] = self._spec
        worker = _Worker(proc, parent, buffer)
        try:
            send(parent, ("init", len(self._spec)), [buffer.fd])
        except OSError:
            pass  # it died at once: told below
        reply = receive(parent)
        if reply is None or reply[0][0] != "ready":
            message = reply[0][2] if reply is not None and reply[0][0] == "error" else None
            self._stop(worker, timeout=0.0)
            if message is None:
                message = f"{exit_description(proc.wait())} while loading the model"
            raise LoadError(message)
        self._worker = worker
        return reply[0][1]

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Runs one batch in the worker: inputs written once into shared memory, outputs copied
        once out of it; the wait releases the GIL."""
        if self._unavailable is not None:
            raise InstanceUnavailable(self._unavailable)
        worker = self._worker if self._worker is not None else self._restart()
        items, needed = plan(inputs)
        fds: list[int] = []
        if needed > worker.inputs.size:
            worker.inputs.close()
            worker.inputs = SharedBuffer(SharedBuffer.sized(needed, worker.inputs.size))
            fds = [worker.inputs.fd]
        layout = write(worker.inputs, items, inputs)
        try:
            send(worker.sock, ("run", layout, worker.inputs.size), fds)
            reply = receive(worker.sock)
        except OSError:
            reply = None
        if reply is None:
            raise self._lost(worker)
        (message, received) = reply
        if message[0] == "error":
            self._failures = 0  # the model raised; its worker is fine
            raise remote_error(message[1], message[2])
        if received:
            if worker.outputs is not None:
                worker.outputs.close()
            worker.outputs = SharedBuffer(message[2], received[0])
        self._failures = 0
        if worker.outputs is None:
            return {}
        return read(worker.outputs, message[1], copy=True)

    def _lost(self, worker: _Worker) -> Exception:
        """The worker exited mid-batch: counts the failure and says why, for this batch's error."""
        self._worker = None
        returncode = worker.proc.wait()
        worker.close()
        _LIVE.discard(self)
        if self._killed:
            return InstanceProcessExited("model instance process was killed after execution_timeout_ms")
        why = exit_description(returncode)
        self._failed(why)
        log.warning("%s: %s; it is restarted for the next batch", self.label, why, extra=self._log_fields)
        return InstanceProcessExited(why)

    def _failed(self, why: str) -> None:
        self._failures += 1
        if self._failures >= self._max_failures:
            self._unavailable = (
                f"its instance process failed {self._failures} times in a row (max_instance_failures; "
                f"last: {why}); reload it to recover"
            )

    def _restart(self) -> _Worker:
        """A new worker after the last one exited, once the backoff for the failures in a row
        has passed (``time.sleep`` releases the GIL)."""
        if self._failures > 1:
            time.sleep(min(BACKOFF_FIRST_S * 2 ** (self._failures - 2), BACKOFF_MAX_S))
        try:
            self._start()
        except Exception as e:
            self._failed(str(e))
            if self._unavailable is not None:
                raise InstanceUnavailable(self._unavailable) from None
            raise InstanceProcessExited(f"restarting the model instance process failed: {e}") from None
        self._unreported_restarts += 1
        _LIVE.add(self)
        assert self._worker is not None
        return self._worker

    def fastserve_kill(self) -> None:
        """Kills the worker running a batch past ``execution_timeout_ms`` (called by the core's
        watchdog, which answers the batch and replaces this instance)."""
        self._killed = True
        worker = self._worker
        if worker is not None:
            worker.proc.kill()

    def fastserve_report(self) -> tuple[int, int | None, str | None]:
        """Restarts since the last report, the worker's resident bytes (read at most every
        ``RSS_EVERY_S``), and why the instance serves no more (None while it does)."""
        restarts, self._unreported_restarts = self._unreported_restarts, 0
        now = time.monotonic()
        worker = self._worker
        if worker is not None and now - self._rss_at >= RSS_EVERY_S:
            self._rss_at = now
            self._rss = resident_bytes(worker.proc.pid)
        return restarts, self._rss, self._unavailable

    def finalize(self) -> None:
        """Stops the worker: it runs the model's ``finalize`` and exits; one that takes longer
        than ``FINALIZE_TIMEOUT_S`` is killed."""
        worker, self._worker = self._worker, None
        _LIVE.discard(self)
        if worker is not None:
            self._stop(worker, FINALIZE_TIMEOUT_S)

    @staticmethod
    def _stop(worker: _Worker, timeout: float) -> None:
        """Asks the worker to finalize and exit within ``timeout`` (0: kills it at once)."""
        if timeout > 0:
            try:
                send(worker.sock, ("stop",))
                worker.sock.settimeout(timeout)
                receive(worker.sock)
                worker.proc.wait(timeout=timeout)
            except (OSError, subprocess.TimeoutExpired):
                log.warning("model instance process %s did not stop in time; it is killed", worker.proc.pid)
        if worker.proc.poll() is None:
            worker.proc.kill()
        worker.proc.wait()
        worker.close()

    def kill_now(self) -> None:
        """Kills the worker without asking it (the server process is exiting)."""
        worker = self._worker
        if worker is not None and worker.proc.poll() is None:
            worker.proc.kill()


def resident_bytes(pid: int) -> int | None:
    """A process's resident memory (Linux ``/proc``), or None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * mmap.PAGESIZE
    except (OSError, ValueError, IndexError):
        return None


@atexit.register
def _kill_workers() -> None:
    """No worker outlives the server: those not stopped by a shutdown are killed at exit."""
    for instance in list(_LIVE):
        instance.kill_now()


def load(ctx: LoadContext) -> LoadedModel:
    """A repository version with ``isolation = "process"``: one worker per placement, each loading
    the model itself; the first one's answer is the version's interface. Combinations a worker
    cannot serve are refused here, by name."""
    from .backends import LoadedModel, LoadError, finalize_instances
    from .tensor import Tensor

    cfg = ctx.config
    if cfg.decoupled:
        raise LoadError(
            'isolation = "process" does not run decoupled models ([model_transaction_policy] '
            'decoupled = true): their responses stream from the instance; use isolation = "thread"'
        )
    if cfg.backend == "ensemble":
        raise LoadError('isolation = "process" applies to models with instances; an ensemble has none of its own')
    instances: list[ProcessInstance] = []
    try:
        for index, device_id in enumerate(cfg.instance_group.placements(), start=ctx.first_instance):
            spec = {
                "kind": "repository",
                "name": ctx.name,
                "version": ctx.version,
                "model_dir": str(ctx.model_dir),
                "version_dir": str(ctx.version_dir),
                "config": cfg.raw,
                "index": index,
                "device_id": device_id,
            }
            instances.append(ProcessInstance(ctx.name, ctx.version, index, spec, cfg.max_instance_failures))
    except BaseException:
        finalize_instances(instances)
        raise
    platform, max_batch_size, inputs, outputs = instances[0].interface
    tensors = [Tensor(*t) for t in inputs], [Tensor(*t) for t in outputs]
    return LoadedModel(platform, max_batch_size, *tensors, instances=list(instances))


def for_object(name: str, version: int, model: Any, seat: int, max_failures: int) -> ProcessInstance:
    """An embedding API model (``Server.add_model(..., isolation="process")``) in a worker: a class
    (or factory function) that the worker imports by name and calls; an object cannot cross."""
    module, qualname = getattr(model, "__module__", None), getattr(model, "__qualname__", "")
    if not callable(model) or module is None or "<locals>" in qualname or module == "__main__":
        raise TypeError(
            f"model '{name}': isolation = \"process\" creates each instance in its worker, so pass a class "
            "or factory defined at the top level of an importable module (not an object, a lambda or __main__)"
        )
    return ProcessInstance(name, version, seat, {"kind": "object", "factory": [module, qualname]}, max_failures)
