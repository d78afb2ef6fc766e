"""The ``fastserve`` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import __version__
from ._core import flush_telemetry
from .logs import setup_logging
from .options import SERVER_OPTIONS, OptionInfo
from .server import Server, StopSignals

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


def boolean(raw: str) -> bool:
    """An on/off value as flags and variables write it (``--strict-readiness false``)."""
    if raw.strip().lower() in _TRUE:
        return True
    if raw.strip().lower() in _FALSE:
        return False
    raise ValueError(raw)


def _add_switch(group: Any, flag: str, default: bool, help: str) -> None:
    """An on/off flag that also takes a value: ``--flag`` (on), ``--flag false`` or ``--flag=false``
    (Triton's spelling), so a switch that defaults to on can be turned off."""
    group.add_argument(
        flag, type=boolean, nargs="?", const=True, default=default, metavar="BOOL", help=f"{help} (default {default})"
    )


def _flag(option: OptionInfo) -> str:
    return "--" + option.name.replace("_", "-")


def _add_option(group: Any, option: OptionInfo) -> None:
    """One ``serve`` flag from the core's description of a server option."""
    default = option.command_default
    shown = "" if default is None else f" (default {default})"
    if option.kind == "bool" and default:
        _add_switch(group, _flag(option), True, option.help)
        return
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


def _add_repository(parser: argparse.ArgumentParser) -> None:
    """``--model-repository`` and ``--model-name``, as every command that reads a repository takes them."""
    parser.add_argument("--model-repository", required=True, type=Path, help="directory of models")
    parser.add_argument(
        "--model-name",
        metavar="NAME",
        help="single-model mode: --model-repository is the directory of this one model (KServe's /mnt/models)",
    )


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fastserve",
        description="Serve models over the KServe V2 protocol.",
        epilog="Run 'fastserve COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"fastserve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    serve = sub.add_parser("serve", help="serve a model repository")
    _add_repository(serve)
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
    _add_switch(
        serve,
        "--exit-on-error",
        False,
        "exit with status 1 when a model fails to load at startup, instead of serving the others",
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
    check = sub.add_parser(
        "check",
        help="validate a model repository without serving it (exit status 1 on any problem)",
        description="Reads every model's configuration (config.toml or config.pbtxt), its version directories "
        "and model files, and lists every problem; exit status 1 if there is any, for CI. --load also loads "
        "every model, as serve would, without listening.",
    )
    _add_repository(check)
    check.add_argument("--load", action="store_true", help="also load every model (runs model code)")
    listing = sub.add_parser("list", help="list the models of a repository: versions, backends, batching")
    _add_repository(listing)
    listing.add_argument("--format", choices=["text", "json"], default="text", help="output format (default text)")
    config = sub.add_parser(
        "config",
        help="print the effective configuration of a model (its file plus every default)",
        description="Prints MODEL's configuration with every default filled in, as config.toml (or JSON); "
        "max_batch_size is absent when the backend chooses it from the model file at load.",
    )
    _add_repository(config)
    config.add_argument("model", metavar="MODEL", help="the model's name (its directory)")
    config.add_argument("--format", choices=["toml", "json"], default="toml", help="output format (default toml)")
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
    with StopSignals() as signals:
        # Listen first (live at once, ready once the models loaded, as Triton), so a port in use is
        # reported before any model loads and probes answer during long loads.
        try:
            server.start(loading=True)
        except OSError as e:
            log.error("%s", _as_flags(str(e)))
            server.stop()
            return 1
        _banner(args, server)
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
        if failed and args.exit_on_error:
            names = ", ".join(f"'{s.name}' version {s.version}" for s in failed)
            log.error("exiting (--exit-on-error): model %s failed to load", names)
            server.stop()
            flush_telemetry()
            return 1
        if failed and not args.strict_readiness:
            log.warning("ready although %d model version(s) failed (--strict-readiness false)", len(failed))
        signals.wait()
        abandoned = server.stop()  # a second signal meanwhile must not kill the drain
    flush_telemetry()
    log.info("stopped")
    if abandoned:
        # Threads stuck in a model's code cannot be stopped, and interpreter shutdown would wait on
        # them: exit now, as the drain timeout promises.
        sys.stderr.flush()
        os._exit(0)
    return 0


def _banner(args: argparse.Namespace, server: Server) -> None:
    """What is starting where: the first thing an operator looks for in the log."""
    host = args.host
    listeners = [f"HTTP {host}:{server.http_port}"]
    if server.grpc_port is not None:
        listeners.append(f"gRPC {host}:{server.grpc_port}")
    if server.metrics_port is not None:
        listeners.append(f"metrics {host}:{server.metrics_port}")
    single = f", single model '{args.model_name}'" if args.model_name else ""
    log.info(
        "fastserve %s: model repository '%s' (control mode %s%s); listening on %s",
        __version__,
        args.model_repository,
        args.model_control_mode,
        single,
        ", ".join(listeners),
    )


def _repository_arg(args: argparse.Namespace, command: str) -> Path | None:
    repo: Path = args.model_repository
    if not repo.is_dir():
        sys.stderr.write(f"fastserve {command}: error: model repository '{repo}' is not a directory\n")
        return None
    return repo


def check(args: argparse.Namespace) -> int:
    """Lists every problem of a repository; 1 if there is any (2: usage)."""
    from .checks import inspect_repository

    repo = _repository_arg(args, "check")
    if repo is None:
        return 2
    report = inspect_repository(repo, args.model_name)
    out = sys.stdout
    for problem in report.problems:
        out.write(f"error: {problem}\n")
    for m in report.models:
        versions = ", ".join(f"{v} ({b or 'no model file'})" for v, b in sorted(m.backends.items()))
        source = m.config_file or "no config file, defaults"
        if m.problems:
            out.write(f"model '{m.name}': {len(m.problems)} problem(s) ({source})\n")
            out.writelines(f"  error: {p}\n" for p in m.problems)
        else:
            out.write(f"model '{m.name}': ok ({source}; version(s) {versions})\n")
        out.writelines(f"  note: {n}\n" for n in m.notes)
    problems = report.problem_count()
    if args.load and problems == 0:
        problems += _check_by_loading(repo, args.model_name)
    out.write(f"{len(report.models)} model(s) checked, {problems} problem(s)\n")
    return 1 if problems else 0


def _check_by_loading(repo: Path, model_name: str | None) -> int:
    """Loads every model in a server that never listens; returns how many versions failed."""
    server = Server(http_port=0)
    try:
        statuses = server.load_repository(repo, model_name=model_name)
    finally:
        server.stop()
    failed = [s for s in statuses if not s.ready]
    for s in failed:
        sys.stdout.write(f"model '{s.name}' version {s.version}: load failed: {s.reason}\n")
    sys.stdout.write(f"loaded: {len(statuses) - len(failed)} model version(s) ready, {len(failed)} failed\n")
    return len(failed)


def list_models(args: argparse.Namespace) -> int:
    """One line per model: versions, backend, max_batch_size, batching, configuration file."""
    from .checks import batching, inspect_repository

    repo = _repository_arg(args, "list")
    if repo is None:
        return 2
    report = inspect_repository(repo, args.model_name)
    rows: list[dict[str, Any]] = []
    for m in report.models:
        cfg = m.config
        rows.append(
            {
                "model": m.name,
                "versions": sorted(m.backends),
                "backend": m.backend,
                "max_batch_size": cfg.max_batch_size if cfg else None,
                "batching": batching(cfg) if cfg else None,
                "config": m.config_file,
                "problems": len(m.problems),
            }
        )
    if args.format == "json":
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return 0
    header = ("MODEL", "VERSIONS", "BACKEND", "MAX_BATCH", "BATCHING", "CONFIG")
    table = [header] + [
        (
            str(r["model"]),
            ",".join(map(str, r["versions"])) or "-",
            str(r["backend"] or "-"),
            "from model" if r["max_batch_size"] is None else str(r["max_batch_size"]),
            str(r["batching"] or f"{r['problems']} problem(s): fastserve check"),
            str(r["config"] or "-"),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        sys.stdout.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() + "\n")
    return 0


def show_config(args: argparse.Namespace) -> int:
    """Prints a model's effective configuration; 1 when the model or its configuration is broken."""
    from .checks import as_toml, effective_config, inspect_model
    from .repository import MODEL_NAME

    repo = _repository_arg(args, "config")
    if repo is None:
        return 2
    single = args.model_name is not None
    if single and args.model != args.model_name:
        sys.stderr.write(f"fastserve config: error: this repository serves only '{args.model_name}'\n")
        return 1
    path = repo if single else repo / args.model
    if not MODEL_NAME.match(args.model) or ".." in args.model or not path.is_dir():
        sys.stderr.write(f"fastserve config: error: model '{args.model}' is not a directory of '{repo}'\n")
        return 1
    report = inspect_model(args.model, path, single=single)
    if report.config is None:
        sys.stderr.writelines(f"fastserve config: error: {p}\n" for p in report.problems)
        return 1
    table = effective_config(report)
    if args.format == "json":
        sys.stdout.write(json.dumps(table, indent=2) + "\n")
    else:
        source = report.config_file or "no config file"
        sys.stdout.write(f"# effective configuration of model '{args.model}' ({source} plus defaults)\n")
        sys.stdout.write(as_toml(table))
    for p in report.problems:
        sys.stderr.write(f"fastserve config: warning: {p}\n")
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
    if args.command == "check":
        return check(args)
    if args.command == "list":
        return list_models(args)
    if args.command == "config":
        return show_config(args)
    # `fastserve` alone: what it can do.
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
