"""Type stubs for the native module built from rust/fastserve-py."""

import os
from collections.abc import Callable, Sequence
from typing import Any

__version__: str

class CoreServer:
    def __init__(
        self,
        host: str = "127.0.0.1",
        http_port: int = 8000,
        max_body_bytes: int = ...,
        worker_threads: int = 0,
        drain_timeout_s: float = 30.0,
        metrics_port: int | None = None,
        access_log: bool = False,
        grpc_port: int | None = None,
        grpc_max_message_bytes: int = ...,
        auth_token: str | None = None,
        admin_token: str | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        tls_client_ca: str | os.PathLike[str] | None = None,
        max_header_bytes: int = 65536,
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
    ) -> None: ...
    def add_model(
        self,
        name: str,
        version: int,
        platform: str,
        inputs: Sequence[tuple[str, str, list[int]]],
        outputs: Sequence[tuple[str, str, list[int]]],
        instances: Sequence[Any],
        max_batch_size: int = 0,
        max_queue_delay_us: int = 0,
        preferred_batch_sizes: Sequence[int] = ...,
        max_queue_size: int = 1024,
        default_queue_timeout_us: int = 0,
        priority_levels: int = 0,
        default_priority_level: int = 0,
        execution_timeout_ms: int = 0,
        instance_factory: Callable[[int], Any] | None = None,
        max_abandoned_instances: int = 4,
    ) -> None: ...
    def add_failed_model(self, name: str, version: int, reason: str) -> None: ...
    def record_load_failure(self, name: str, version: int) -> None: ...
    def remove_model(self, name: str, version: int | None = None) -> int: ...
    def models(self) -> list[tuple[str, int, bool]]: ...
    def set_routing(self, name: str, labels: dict[str, int], weights: dict[int, int]) -> None: ...
    def set_repository_control(self, manager: Any | None) -> None: ...
    def set_starting(self, on: bool) -> None: ...
    def set_private_paths(self, paths: list[str]) -> None: ...
    def start(self) -> int: ...
    def stop(self) -> int: ...
    @property
    def http_port(self) -> int | None: ...
    @property
    def metrics_port(self) -> int | None: ...
    @property
    def grpc_port(self) -> int | None: ...
    def is_ready(self) -> bool: ...

OTEL_AVAILABLE: bool

def init_logging(level: str = "info", json: bool = False, otel_endpoint: str | None = None) -> bool: ...
def flush_telemetry() -> None: ...
def log(level: str, target: str, message: str) -> None: ...
