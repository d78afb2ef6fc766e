"""The embedding API: run fastserve inside a Python service, with models registered in code,
loaded from a repository, or both."""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import _core, isolation
from .backends import finalize_instances
from .logs import ensure_logging
from .options import SERVER_OPTIONS, model_default
from .repository import CONTROL_MODES, ModelRepository, RepositoryApi, VersionStatus
from .tensor import Tensor

_running: weakref.WeakSet[Server] = weakref.WeakSet()
log = logging.getLogger("fastserve")


def _default(name: str) -> Any:
    return next(o.default for o in SERVER_OPTIONS if o.name == name)


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

    def __init__(self, host: str | None = None, http_port: int | None = None, **options: Any) -> None:
        """``host`` (default 127.0.0.1) and ``http_port`` (default 8000; 0 picks a free port), and
        any other server option as a keyword: ``grpc_port`` (None, the default, serves HTTP only),
        ``metrics_port`` (Prometheus ``/metrics``; None = off), ``access_log``, ``drain_timeout_s``,
        ``auth_token``/``admin_token``, ``tls_cert``/``tls_key``/``tls_client_ca``, the limits
        (``max_body_bytes``, ``max_header_bytes``, ``idle_timeout_s``, ...) and more:
        ``fastserve.options.SERVER_OPTIONS`` lists every one with its default and meaning (the same
        table as ``fastserve serve --help``). An unknown keyword or a bad value raises
        ``ValueError``; an unreadable TLS file ``OSError``."""
        given = {"host": host, "http_port": http_port, **options}
        self._core = _core.CoreServer(
            {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in given.items() if v is not None}
        )
        self._repository: ModelRepository | None = None
        drain = options.get("drain_timeout_s")
        self._drain_timeout_s = float(_default("drain_timeout_s") if drain is None else drain)

    def add_model(
        self,
        name: str,
        model: Any,
        *,
        inputs: Sequence[Tensor],
        outputs: Sequence[Tensor],
        version: int = 1,
        instance_count: int = 1,
        platform: str = "python",
        **options: Any,
    ) -> None:
        """Serves ``model`` (an object with ``execute``) under ``name``/``version``.

        Pass a class or factory instead of an object to get ``instance_count`` separate instances;
        an object is shared by all instances. ``options`` are the model options
        (``fastserve.options.MODEL_OPTIONS``, the ``config.toml`` batching and queue keys):
        ``max_batch_size``, ``max_queue_delay_us``, ``preferred_batch_sizes``, ``max_queue_size``,
        ``default_queue_timeout_us``, ``priority_levels``, ``default_priority_level``,
        ``execution_timeout_ms`` (a batch running longer fails and its instance is replaced) and
        ``max_abandoned_instances`` (hung instances left running before the version is marked
        unavailable: a thread cannot be killed), ``decoupled`` (``execute`` is a generator or
        an async generator and each ``yield`` is one response, streamed to the client),
        ``isolation`` (``"process"``: each instance runs in a worker process of its own, which imports
        ``model`` (a top-level class or factory) by name and calls it; ``max_instance_failures`` exits
        in a row mark the version unavailable) and
        ``sequence_batching`` (a dict of the ``config.toml`` ``[sequence_batching]`` table: stateful
        models whose requests carry sequence ids).
        """
        try:  # bad options first, before any instance is made
            _core.check_model_options(options)
        except ValueError as e:
            raise ValueError(f"model '{name}': {e}") from None
        expected = "add_model takes an object with execute(inputs), or a class or factory that makes one"
        if isinstance(model, type) and not callable(getattr(model, "execute", None)):
            raise TypeError(f"model '{name}': class {model.__name__} has no execute(inputs) method ({expected})")
        if not hasattr(model, "execute") and not callable(model):
            raise TypeError(f"model '{name}': {type(model).__name__} has no execute(inputs) method ({expected})")
        factory: Callable[[], Any] | None = model if isinstance(model, type) or not hasattr(model, "execute") else None
        create: Callable[[int], Any]
        if options.get("isolation", model_default("isolation")) == isolation.ISOLATION_PROCESS:
            # Each instance is a worker process with its own copy of the model (or its own
            # factory() call there): an object is never shared across processes.
            failures = options.get("max_instance_failures", model_default("max_instance_failures"))

            def create(seat: int) -> Any:
                return isolation.for_object(name, version, model, seat, failures)

        elif factory is not None:
            create = lambda _seat: factory()  # noqa: E731
        else:
            create = lambda _seat: model  # noqa: E731
        instances: list[Any] = []
        try:
            for seat in range(instance_count):
                instances.append(create(seat))
                if not callable(getattr(instances[-1], "execute", None)):
                    kind = type(instances[-1]).__name__
                    raise TypeError(f"model '{name}': {kind} has no execute(inputs) method ({expected})")
        except BaseException:
            finalize_instances(instances)
            raise
        self._core.add_model(
            name,
            version,
            platform,
            [t.as_tuple() for t in inputs],
            [t.as_tuple() for t in outputs],
            instances,
            options,
            create,
        )

    def add_ensemble(
        self,
        name: str,
        steps: Sequence[dict[str, Any]],
        *,
        inputs: Sequence[Tensor],
        outputs: Sequence[Tensor],
        version: int = 1,
        instance_count: int = 8,
        **options: Any,
    ) -> None:
        """Serves an ensemble of models already added: ``steps`` are ``config.toml``'s
        ``[[ensemble.step]]`` tables as dicts (``model_name``, ``model_version`` (-1: the default),
        ``input_map`` {model input: ensemble tensor}, ``output_map`` {model output: ensemble
        tensor}). The core runs each step on its model's own queue as soon as its inputs exist;
        ``instance_count`` ensemble requests (or batches, with ``max_batch_size``) run at once.
        Raises ``ValueError`` naming the step when the graph does not fit its models."""
        self._core.add_ensemble(
            name,
            version,
            [t.as_tuple() for t in inputs],
            [t.as_tuple() for t in outputs],
            {"step": list(steps)},
            instance_count,
            options,
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
        ``load_models`` ("*" = all). The repository index is served in every mode; poll and explicit
        modes also enable loading and unloading through the repository API.
        ``model_name``: single-model mode, ``path`` is that one model's directory (KServe mounts a
        model at ``/mnt/models``); raises ValueError for an invalid name.
        """
        if control_mode not in CONTROL_MODES:
            raise ValueError(f"control_mode must be one of {', '.join(CONTROL_MODES)}")
        repository = ModelRepository(self._core, Path(path), model_name)
        # The index is readable in every mode; load/unload only in poll and explicit. Refused before
        # anything loads when management would be open to the network.
        self._core.set_repository_control(RepositoryApi(repository), writable=control_mode != "none")
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

    def load_model(self, name: str, config: dict[str, Any] | None = None) -> list[VersionStatus]:
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

    def start(self, loading: bool = False) -> Server:
        """Binds the listeners and serves in background threads. ``loading=True``: live but not
        ready until ``load_repository()`` has loaded the startup models (listen first, then load, as
        the command and Triton do; without it a probe between the two would see a ready server with
        no models). Logging works without set-up (info level, text, stderr); call
        ``fastserve.setup_logging`` first to choose level or format."""
        ensure_logging()
        if loading:
            self._core.set_starting(True)
        self._core.start()
        _running.add(self)
        return self

    def serve_forever(self) -> int:
        """Serves until SIGINT or SIGTERM (Ctrl-C, ``docker stop``, Kubernetes), then drains and stops
        as the ``fastserve`` command does; starts the server if it is not running. Returns what
        ``stop()`` returns. Signals can only be handled in the main thread: elsewhere it serves until
        the process ends."""
        with StopSignals() as signals:
            if self.http_port is None:
                self.start()
            signals.wait()
            return self.stop()  # a second signal meanwhile must not kill the drain

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


# How often the main thread wakes to run pending signal handlers (see StopSignals.wait).
SIGNAL_CHECK_S = 0.2


class StopSignals:
    """SIGINT and SIGTERM ask for a stop (logged) instead of killing the process, while in the
    ``with`` block; the previous handlers come back after it. Off the main thread (where Python
    cannot handle signals) nothing is installed and ``wait`` blocks until the process ends."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._previous: dict[int, Any] = {}

    def _request_stop(self, signum: int, _frame: object) -> None:
        log.info("received %s, draining", signal.Signals(signum).name)
        self._stop.set()

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def wait(self) -> None:
        """Blocks until a stop was asked for. Waits in slices: Python runs a signal handler only
        when the main thread runs bytecode, and a signal the kernel hands to one of the server's
        own threads does not interrupt a wait without a timeout."""
        while not self._stop.wait(SIGNAL_CHECK_S):
            pass
