"""fastserve: serve ONNX and Python models over the KServe V2 protocol, with a Rust core."""

from ._core import __version__
from .backends import LoadError
from .call import infer, infer_async
from .config import ConfigError
from .repository import VersionStatus
from .server import Server
from .tensor import Tensor

__all__ = ["ConfigError", "LoadError", "Server", "Tensor", "VersionStatus", "__version__", "infer", "infer_async"]
