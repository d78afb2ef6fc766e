"""The worker process of a process-isolated instance: ``python -m fastserve.worker FD PARENT_PID``.

It loads one instance of one model (``initialize`` runs here), then runs the batches its
:class:`fastserve.isolation.ProcessInstance` sends over socket ``FD`` until told to stop (then
``finalize`` runs here) or until the server is gone: ``PR_SET_PDEATHSIG`` kills it when the server
dies, even mid-batch, and a closed socket ends it between batches.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import importlib
import inspect
import json
import logging
import os
import signal
import socket
import sys
import traceback
from pathlib import Path
from typing import Any

PR_SET_PDEATHSIG = 1

log = logging.getLogger("fastserve.worker")


def die_with_parent(parent: int) -> None:
    """Asks the kernel for SIGKILL when the server exits, then checks it did not exit already
    (before the request was made)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the closed socket still ends the worker between batches
    if os.getppid() != parent:
        os._exit(0)


def load(spec: dict[str, Any]) -> tuple[Any, tuple[str, int, list[Any], list[Any]]]:
    """The one model instance ``spec`` describes, and the interface it serves (platform,
    max_batch_size, inputs, outputs)."""
    from .backends import LoadContext, LoadError, load_version
    from .config import parse_config

    if spec["kind"] == "object":
        module, qualname = spec["factory"]
        factory: Any = importlib.import_module(module)
        for part in qualname.split("."):
            factory = getattr(factory, part)
        return factory(), ("python", 0, [], [])
    config = parse_config(spec["config"])
    group = config.instance_group
    device = spec["device_id"]
    one = dataclasses.replace(group, count=1, gpus=[device] if device is not None else group.gpus, isolation="thread")
    ctx = LoadContext(
        name=spec["name"],
        version=spec["version"],
        model_dir=Path(spec["model_dir"]),
        version_dir=Path(spec["version_dir"]),
        config=dataclasses.replace(config, instance_group=one),
        first_instance=spec["index"],
    )
    loaded = load_version(ctx)
    instance = loaded.instances[0]
    if hasattr(instance, "execute_requests"):
        instance.finalize()
        raise LoadError(
            'isolation = "process" runs class Model (execute(inputs) -> outputs), not Triton\'s '
            'TritonPythonModel: use isolation = "thread" for it'
        )
    tensors = ([t.as_tuple() for t in loaded.inputs], [t.as_tuple() for t in loaded.outputs])
    return instance, (loaded.platform, loaded.max_batch_size, *tensors)


def main(argv: list[str]) -> int:
    fd, parent = int(argv[1]), int(argv[2])
    die_with_parent(parent)
    # Ctrl-C reaches the whole process group: the server drains and stops its workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from . import isolation as iso

    sock = socket.socket(fileno=fd)
    first = iso.receive(sock)
    if first is None:
        return 0
    (_, size), fds = first
    inputs = iso.SharedBuffer(os.fstat(fds[0]).st_size, fds[0])
    spec = json.loads(inputs.map[:size])
    sys.path[:] = spec["sys_path"]
    try:
        model, interface = load(spec)
    except Exception as e:
        iso.send(sock, ("error", type(e).__name__, str(e)[: iso.MAX_ERROR_CHARS]))
        return 1
    iso.send(sock, ("ready", interface))
    outputs: iso.SharedBuffer | None = None
    event_loop: asyncio.AbstractEventLoop | None = None
    while True:
        received = iso.receive(sock)
        if received is None:
            break  # the server is gone
        message, fds = received
        if message[0] == "stop":
            finalize = getattr(model, "finalize", None)
            if callable(finalize):
                try:
                    finalize()
                except Exception:
                    log.exception("finalize() raised")
            iso.send(sock, ("stopped",))
            break
        _, layout, in_size = message
        if fds:
            inputs.close()
            inputs = iso.SharedBuffer(in_size, fds[0])
        try:
            result = model.execute(iso.read(inputs, layout, copy=False))
            if inspect.isawaitable(result):
                event_loop = event_loop or asyncio.new_event_loop()
                result = event_loop.run_until_complete(result)
            if not isinstance(result, dict):
                raise TypeError(f"execute() must return a dict of output name to array, got {type(result).__name__}")
            items, needed = iso.plan(result)
        except Exception as e:
            log.debug("execute() raised: %s", traceback.format_exc())
            iso.send(sock, ("error", type(e).__name__, str(e)[: iso.MAX_ERROR_CHARS]))
            continue
        grown: list[int] = []
        if outputs is None or needed > outputs.size:
            old = outputs.size if outputs is not None else 0
            if outputs is not None:
                outputs.close()
            outputs = iso.SharedBuffer(iso.SharedBuffer.sized(needed, old))
            grown = [outputs.fd]
        written = iso.write(outputs, items, result)
        iso.send(sock, ("ok", written, outputs.size), grown)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
