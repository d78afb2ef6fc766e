"""The ``fastserve`` command."""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import __version__
from ._core import flush_telemetry
from .logs import setup_logging
from .options import SERVER_OPTIONS, OptionInfo
from .server import Server

log = logging.getLogger("fastserve")

AUTH_TOKEN_ENV = "FASTSERVE_AUTH_TOKEN"
ADMIN_TOKEN_ENV = "FASTSERVE_ADMIN_TOKEN"
# Every `serve` flag --some-flag falls back to $FASTSERVE_SOME_FLAG (containers configure through the
# environment); a flag given on the command line wins.
ENV_PREFIX = "FASTSERVE_"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One clear line and exit status 2, as for every usage error.
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


class _Append(argparse.Action):
    """A repeatable flag collecting a list; given at all, it replaces the default (from the environment)."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: Any = None
    ) -> None:
        current = getattr(namespace, self.dest)
        setattr(namespace, self.dest, [*([] if current is self.default else current), values])


def env_name(action: argparse.Action) -> str:
    """``--drain-timeout-s`` -> ``FASTSERVE_DRAIN_TIMEOUT_S``."""
    return ENV_PREFIX + action.option_strings[-1].lstrip("-").replace("-", "_").upper()


def _env_value(action: argparse.Action, name: str, raw: str) -> Any:
    """``raw`` converted as the flag would convert it; ValueError names the variable."""
    if action.nargs == 0:  # on/off flags
        if raw.strip().lower() not in _TRUE + _FALSE:
            raise ValueError(f"{name}={raw!r} is not one of {', '.join(_TRUE + _FALSE)}")
        return raw.strip().lower() in _TRUE
    if isinstance(action, _Append):
        return [item.strip() for item in raw.split(",") if item.strip()]
    try:
        value = action.type(raw) if callable(action.type) else raw
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a valid {action.option_strings[-1]}") from None
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{name}={raw!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def _env_defaults(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """Defaults every flag of ``parser`` from its ``FASTSERVE_*`` variable (an empty one counts as unset)."""
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        name = env_name(action)
        action.help = f"{action.help or ''} [env {name}]".strip()
        raw = environ.get(name, "")
        if raw.strip():
            try:
                action.default = _env_value(action, name, raw)
            except ValueError as e:
                parser.error(str(e))
            action.required = False


def _flag(option: OptionInfo) -> str:
    return "--" + option.name.replace("_", "-")


def _add_option(group: Any, option: OptionInfo) -> None:
    """One ``serve`` flag from the core's description of a server option."""
    default = option.command_default
    shown = "" if default is None else f" (default {default})"
    if option.kind == "bool":
        group.add_argument(_flag(option), action="store_true", help=option.help)
        return
    kinds: dict[str, Any] = {"int": int, "float": float, "str": str, "path": Path}
    group.add_argument(
        _flag(option),
        type=kinds[option.kind],
        default=default,
        choices=option.choices or None,
        metavar="PATH" if option.kind == "path" else None,
        help=option.help + shown,
    )


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="fastserve", description="Serve models over the KServe V2 protocol.")
    parser.add_argument("--version", action="version", version=f"fastserve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    serve = sub.add_parser("serve", help="serve a model repository")
    serve.add_argument("--model-repository", required=True, type=Path, help="directory of models")
    serve.add_argument(
        "--model-name",
        metavar="NAME",
        help="single-model mode: --model-repository is the directory of this one model (KServe's /mnt/models)",
    )
    serve.add_argument(
        "--model-control-mode",
        default="none",
        choices=["none", "poll", "explicit"],
        help="none: load everything at start; poll: also rescan the repository; explicit: load on request",
    )
    serve.add_argument("--repository-poll-secs", type=float, default=15.0, help="rescan interval in poll mode")
    serve.add_argument(
        "--load-model",
        action=_Append,
        default=[],
        metavar="NAME",
        help="explicit mode: load NAME at start ('*': all; env: comma-separated)",
    )
    serve.add_argument("--no-metrics", action="store_true", help="do not serve /metrics")
    serve.add_argument("--log-level", default="info", choices=["error", "warning", "info", "debug"])
    serve.add_argument("--log-format", default="text", choices=["text", "json"])
    serve.add_argument(
        "--otel-endpoint", help="export request spans to this OTLP/HTTP traces URL (needs the otel build feature)"
    )
    groups = {
        "server": serve,
        "limits": serve.add_argument_group("limits"),
        "security": serve.add_argument_group("security"),
    }
    for option in SERVER_OPTIONS:
        if option.group != "hidden":
            _add_option(groups[option.group], option)
    groups["security"].add_argument(
        "--auth-token-file",
        type=Path,
        metavar="PATH",
        help=f"require 'Authorization: Bearer <token>' for inference, metadata and statistics "
        f"(token read from PATH, or from ${AUTH_TOKEN_ENV})",
    )
    groups["security"].add_argument(
        "--admin-token-file",
        type=Path,
        metavar="PATH",
        help=f"token for the repository API (or ${ADMIN_TOKEN_ENV}); without it the repository API takes the "
        "inference token",
    )
    _env_defaults(serve, os.environ if environ is None else environ)
    convert = sub.add_parser(
        "convert-config",
        help="print the config.toml equivalent of a Triton model's config.pbtxt",
        description="Prints the config.toml that says what MODEL_DIR/config.pbtxt (Triton's model configuration) "
        "says, so a model can move over; fastserve also loads config.pbtxt as it is.",
    )
    convert.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="a model directory with config.pbtxt")
    return parser


def _read_token(path: Path | None, env: str, flag: str) -> str | None:
    """The token from ``path`` or the environment; raises ValueError with a message (never the token)."""
    if path is not None:
        try:
            token = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read {flag} '{path}': {e.__class__.__name__}") from None
        if not token:
            raise ValueError(f"{flag} '{path}' is empty")
        return token
    token = os.environ.get(env, "").strip()
    return token or None


def _as_flags(message: str) -> str:
    """The core names options as keywords (``max_body_bytes``); a command user typed flags."""
    for option in SERVER_OPTIONS:
        message = re.sub(rf"\b{option.name}\b", _flag(option), message)
    return message


def _build_server(args: argparse.Namespace, auth_token: str | None, admin_token: str | None) -> Server:
    options = {o.name: getattr(args, o.name) for o in SERVER_OPTIONS if o.group != "hidden"}
    if args.no_metrics:
        options["metrics_port"] = None
    return Server(**options, auth_token=auth_token, admin_token=admin_token)


def serve(args: argparse.Namespace) -> int:
    repo: Path = args.model_repository
    if not repo.is_dir():
        sys.stderr.write(f"fastserve: error: model repository '{repo}' is not a directory\n")
        return 2
    try:
        auth_token = _read_token(args.auth_token_file, AUTH_TOKEN_ENV, "--auth-token-file")
        admin_token = _read_token(args.admin_token_file, ADMIN_TOKEN_ENV, "--admin-token-file")
    except ValueError as e:
        sys.stderr.write(f"fastserve: error: {e}\n")
        return 2
    try:
        setup_logging(args.log_level, args.log_format, args.otel_endpoint)
    except RuntimeError as e:
        sys.stderr.write(f"fastserve: error: {e}\n")
        return 2
    try:
        server = _build_server(args, auth_token, admin_token)
    except (ValueError, OverflowError) as e:
        # A value out of range (a negative count cannot even be converted), named by its flag.
        sys.stderr.write(f"fastserve: error: {_as_flags(str(e))}\n")
        return 2
    except OSError as e:
        # Unreadable or mismatched TLS files: one line, no traceback.
        sys.stderr.write(f"fastserve: error: {e}\n")
        return 1
    if args.host not in ("127.0.0.1", "localhost", "::1") and auth_token is None:
        log.warning("listening on %s without --auth-token-file: anyone who can reach it may run inference", args.host)
    if args.load_model and args.model_control_mode != "explicit":
        sys.stderr.write("fastserve: error: --load-model needs --model-control-mode explicit\n")
        return 2
    if args.repository_poll_secs <= 0:
        sys.stderr.write("fastserve: error: --repository-poll-secs must be positive\n")
        return 2
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        log.info("received %s, draining", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    # Listen first (live at once, ready once the models loaded, as Triton), so a port in use is
    # reported before any model loads and probes answer during long loads.
    try:
        server.start()
    except OSError as e:
        log.error("%s", e)
        server.stop()
        return 1
    try:
        statuses = server.load_repository(
            repo,
            control_mode=args.model_control_mode,
            load_models=args.load_model,
            poll_secs=args.repository_poll_secs,
            model_name=args.model_name,
        )
    except (ValueError, PermissionError) as e:
        sys.stderr.write(f"fastserve: error: {e}\n")
        server.stop()
        return 2
    failed = [s for s in statuses if not s.ready]
    log.info("%d model version(s) ready, %d failed", len(statuses) - len(failed), len(failed))
    stop.wait()
    abandoned = server.stop()
    flush_telemetry()
    log.info("stopped")
    if abandoned:
        # Threads stuck in a model's code cannot be stopped, and interpreter shutdown would wait on
        # them: exit now, as the drain timeout promises.
        sys.stderr.flush()
        os._exit(0)
    return 0


def convert_config(model_dir: Path) -> int:
    """Prints the config.toml of a config.pbtxt; what fastserve does not honor fails with exit 1."""
    from .config import ConfigError
    from .pbtxt import convert

    path = model_dir / "config.pbtxt"
    try:
        converted = convert(path.read_text(encoding="utf-8"), model_dir.resolve().name)
    except (OSError, UnicodeDecodeError, ConfigError) as e:
        sys.stderr.write(f"fastserve convert-config: {e}\n")
        return 1
    header = f"# config.toml converted from {path} by fastserve convert-config\n"
    if converted.warnings:
        header += "# Performance-only fields with no effect in fastserve: " + ", ".join(converted.warnings) + "\n"
    sys.stdout.write(header + "\n" + converted.toml)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "convert-config":
        return convert_config(args.model_dir)
    # `fastserve` alone: what it can do.
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
