"""The embedding API: run fastserve inside a Python service, with models registered in code,
loaded from a repository, or both."""

from __future__ import annotations

import atexit
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import _core
from .repository import VersionStatus, load_model, load_repository
from .tensor import Tensor

_running: weakref.WeakSet[Server] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    # Model threads need the interpreter; stop them before it finalizes.
    for server in list(_running):
        server.stop()


class Server:
    """A fastserve server. ``start()`` returns at once; requests are served by background threads.

    >>> server = Server(http_port=0)
    >>> server.add_model("double", Double(), inputs=[Tensor("X", "FP32", [-1])],
    ...                  outputs=[Tensor("Y", "FP32", [-1])], max_batch_size=32)
    >>> with server:  # start() ... stop()
    ...     print(server.http_port)

    ``grpc_port`` adds the KServe V2 gRPC endpoint (0 picks a free port; ``None``, the default,
    serves HTTP only). Both protocols feed the same queues, so a batch may mix their requests.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        http_port: int = 8000,
        *,
        max_body_bytes: int = 64 * 1024 * 1024,
        drain_timeout_s: float = 30.0,
        worker_threads: int = 0,
        grpc_port: int | None = None,
        grpc_max_message_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self._core = _core.CoreServer(
            host=host,
            http_port=http_port,
            max_body_bytes=max_body_bytes,
            worker_threads=worker_threads,
            drain_timeout_s=drain_timeout_s,
            grpc_port=grpc_port,
            grpc_max_message_bytes=grpc_max_message_bytes,
        )
        self._repository: Path | None = None

    def add_model(
        self,
        name: str,
        model: Any,
        *,
        inputs: Sequence[Tensor],
        outputs: Sequence[Tensor],
        version: int = 1,
        max_batch_size: int = 0,
        max_queue_delay_us: int = 0,
        preferred_batch_sizes: Sequence[int] = (),
        max_queue_size: int = 1024,
        instance_count: int = 1,
        platform: str = "python",
    ) -> None:
        """Serves ``model`` (an object with ``execute``) under ``name``/``version``.

        Pass a class or factory instead of an object to get ``instance_count`` separate instances;
        an object is shared by all instances.
        """
        factory: Callable[[], Any] | None = model if isinstance(model, type) or not hasattr(model, "execute") else None
        if factory is None:
            instances = [model] * instance_count
        else:
            instances = [factory() for _ in range(instance_count)]
        self._core.add_model(
            name,
            version,
            platform,
            [t.as_tuple() for t in inputs],
            [t.as_tuple() for t in outputs],
            instances,
            max_batch_size=max_batch_size,
            max_queue_delay_us=max_queue_delay_us,
            preferred_batch_sizes=list(preferred_batch_sizes),
            max_queue_size=max_queue_size,
        )

    def load_repository(self, path: str | Path) -> list[VersionStatus]:
        """Loads every model in a repository directory; returns what loaded and what failed."""
        self._repository = Path(path)
        return load_repository(self._core, self._repository)

    def load_model(self, name: str) -> list[VersionStatus]:
        """(Re)loads one model of the repository given to ``load_repository``."""
        if self._repository is None:
            raise RuntimeError("load_repository() first")
        return load_model(self._core, self._repository, name)

    def unload_model(self, name: str, version: int | None = None) -> int:
        """Drains and removes a model (or one version); returns how many versions were removed."""
        return self._core.remove_model(name, version)

    def models(self) -> list[tuple[str, int, bool]]:
        """``(name, version, ready)`` for every registered version."""
        return self._core.models()

    def start(self) -> Server:
        self._core.start()
        _running.add(self)
        return self

    def stop(self) -> None:
        """Stops accepting, answers in-flight requests, drains and finalizes every model."""
        self._core.stop()
        _running.discard(self)

    @property
    def http_port(self) -> int | None:
        return self._core.http_port

    @property
    def grpc_port(self) -> int | None:
        """The bound gRPC port while running, or None without a gRPC listener."""
        return self._core.grpc_port

    @property
    def is_ready(self) -> bool:
        return self._core.is_ready()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
