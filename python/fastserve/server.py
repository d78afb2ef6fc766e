"""The embedding API: run fastserve inside a Python service, with models registered in code,
loaded from a repository, or both."""

from __future__ import annotations

import atexit
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import _core
from .repository import CONTROL_MODES, ModelRepository, RepositoryApi, VersionStatus
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
        metrics_port: int | None = None,
        access_log: bool = False,
        grpc_port: int | None = None,
        grpc_max_message_bytes: int = 64 * 1024 * 1024,
        auth_token: str | None = None,
        admin_token: str | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        tls_client_ca: str | Path | None = None,
        max_header_bytes: int = 64 * 1024,
        max_headers: int = 100,
        max_json_depth: int = 64,
        max_request_elements: int | None = None,
        max_connections: int = 16384,
        grpc_max_concurrent_streams: int = 256,
        header_read_timeout_s: float = 30.0,
        body_read_timeout_s: float = 60.0,
        idle_timeout_s: float = 120.0,
        grpc_response_compression: str = "none",
        allow_remote_repository_api: bool = False,
    ) -> None:
        """``metrics_port``: serve Prometheus ``/metrics`` there (0 = any free port, None = off).
        ``access_log``: one log line per inference request.

        ``auth_token``: require ``Authorization: Bearer <token>`` (gRPC metadata ``authorization``)
        on inference, metadata and statistics; ``admin_token``: the token of the repository API,
        which takes ``auth_token`` when no admin token is set. Health probes and ``/metrics`` stay open.
        ``tls_cert``/``tls_key``: PEM files; HTTP and gRPC then speak TLS only. ``tls_client_ca``:
        also require client certificates issued by this CA (mTLS). Bad files raise ``OSError``.

        Limits (README, Security, "Limits"): ``max_header_bytes`` and ``max_headers`` bound a request
        head (431); ``max_json_depth`` the nesting of JSON bodies (400, at most 127);
        ``max_request_elements`` the tensor elements of a request's inputs (413; default: as many as
        the largest body or gRPC message holds); ``max_connections`` the open connections over all
        listeners (more are closed on accept); ``grpc_max_concurrent_streams`` the calls per gRPC
        connection. Slow clients: ``header_read_timeout_s`` (HTTP/1 head, 408),
        ``body_read_timeout_s`` (body, 408), ``idle_timeout_s`` (connections without a request are
        closed). Bad values raise ``ValueError``.

        ``grpc_response_compression``: "none" (default, as Triton), "gzip" or "deflate" — compress gRPC
        responses for clients that accept it; compressed requests are always accepted.
        ``allow_remote_repository_api``: serve the repository API on a non-loopback ``host`` without an
        ``admin_token`` (refused otherwise: model management must not be open to the network)."""
        self._core = _core.CoreServer(
            host=host,
            http_port=http_port,
            max_body_bytes=max_body_bytes,
            worker_threads=worker_threads,
            drain_timeout_s=drain_timeout_s,
            metrics_port=metrics_port,
            access_log=access_log,
            grpc_port=grpc_port,
            grpc_max_message_bytes=grpc_max_message_bytes,
            auth_token=auth_token,
            admin_token=admin_token,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_client_ca=tls_client_ca,
            max_header_bytes=max_header_bytes,
            max_headers=max_headers,
            max_json_depth=max_json_depth,
            max_request_elements=max_request_elements,
            max_connections=max_connections,
            grpc_max_concurrent_streams=grpc_max_concurrent_streams,
            header_read_timeout_s=header_read_timeout_s,
            body_read_timeout_s=body_read_timeout_s,
            idle_timeout_s=idle_timeout_s,
            grpc_response_compression=grpc_response_compression,
            allow_remote_repository_api=allow_remote_repository_api,
        )
        self._repository: ModelRepository | None = None
        self._drain_timeout_s = drain_timeout_s

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
        default_queue_timeout_us: int = 0,
        priority_levels: int = 0,
        default_priority_level: int = 0,
        execution_timeout_ms: int = 0,
        max_abandoned_instances: int = 4,
        instance_count: int = 1,
        platform: str = "python",
    ) -> None:
        """Serves ``model`` (an object with ``execute``) under ``name``/``version``.

        Pass a class or factory instead of an object to get ``instance_count`` separate instances;
        an object is shared by all instances. With ``execution_timeout_ms`` a batch running longer
        fails and its instance is replaced; once ``max_abandoned_instances`` hung ones are still
        running, the version is marked unavailable instead (a thread cannot be killed).
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
            default_queue_timeout_us=default_queue_timeout_us,
            priority_levels=priority_levels,
            default_priority_level=default_priority_level,
            execution_timeout_ms=execution_timeout_ms,
            instance_factory=(lambda _seat: factory()) if factory is not None else (lambda _seat: model),
            max_abandoned_instances=max_abandoned_instances,
        )

    def load_repository(
        self,
        path: str | Path,
        *,
        control_mode: str = "none",
        load_models: Sequence[str] | None = None,
        poll_secs: float = 15.0,
        model_name: str | None = None,
    ) -> list[VersionStatus]:
        """Serves a model repository; returns what loaded and what failed.

        ``control_mode``: "none" loads every model now; "poll" also rescans every ``poll_secs``
        (added, changed and removed models are loaded, reloaded, unloaded); "explicit" loads only
        ``load_models`` ("*" = all). Poll and explicit modes enable the repository API.
        ``model_name``: single-model mode, ``path`` is that one model's directory (KServe mounts a
        model at ``/mnt/models``); raises ValueError for an invalid name.
        """
        if control_mode not in CONTROL_MODES:
            raise ValueError(f"control_mode must be one of {', '.join(CONTROL_MODES)}")
        repository = ModelRepository(self._core, Path(path), model_name)
        if control_mode != "none":
            # Refused before anything loads when management would be open to the network.
            self._core.set_repository_control(RepositoryApi(repository))
        self._repository = repository
        root = Path(path)
        self._core.set_private_paths(sorted({str(root), str(root.absolute()), str(root.resolve())}))
        # Live but not ready while the models load, as Triton: probes answer during long loads.
        self._core.set_starting(True)
        try:
            if control_mode == "explicit":
                names = None if load_models is not None and "*" in load_models else list(load_models or [])
                statuses = repository.load_all(names)
            else:
                statuses = repository.load_all()
        finally:
            self._core.set_starting(False)
        if control_mode == "poll":
            repository.start_polling(poll_secs)
        return statuses

    def load_model(self, name: str, config: dict | None = None) -> list[VersionStatus]:
        """(Re)loads one model of the repository, optionally with config.toml keys overridden."""
        if self._repository is None:
            raise RuntimeError("load_repository() first")
        return self._repository.load(name, config)

    def unload_model(self, name: str, version: int | None = None) -> int:
        """Drains and removes a model (or one version); returns how many versions were removed."""
        if self._repository is not None and version is None:
            return self._repository.unload(name)
        return self._core.remove_model(name, version)

    def models(self) -> list[tuple[str, int, bool]]:
        """``(name, version, ready)`` for every registered version."""
        return self._core.models()

    def start(self) -> Server:
        self._core.start()
        _running.add(self)
        return self

    def stop(self) -> int:
        """Stops accepting, answers in-flight requests, drains and finalizes every model; bounded by
        ``drain_timeout_s`` plus a few seconds. Returns how many model threads were left running
        (stuck in a model's ``execute`` or ``finalize``): they cannot be stopped, so a process that
        got a non-zero answer should exit with ``os._exit`` rather than wait for them."""
        if self._repository is not None:
            # A poll may be loading a model: shutdown stays bounded and does not wait for it long.
            self._repository.stop(timeout_s=min(self._drain_timeout_s, 1.0))
        abandoned = self._core.stop()
        _running.discard(self)
        return abandoned

    @property
    def http_port(self) -> int | None:
        return self._core.http_port

    @property
    def metrics_port(self) -> int | None:
        return self._core.metrics_port

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
