"""``dicom-gateway`` command line: argparse in front of the composition root and the operator tools."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio
import yaml

from gateway import __version__, cli_queue, logs
from gateway.cli_rules import add_rules_commands
from gateway.demo.run import run_demo
from gateway.doctor import run_doctor
from gateway.errors import ConfigError, GatewayError
from gateway.scu import echo_peer
from gateway.service import Gateway
from gateway.settings import Peer, Settings, load_settings


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (GatewayError, KeyboardInterrupt, BaseExceptionGroup) as exc:
        return _exit_code(exc, _innermost(exc))


def _innermost(exc: BaseException) -> BaseException:
    """The one error a task group wrapped (serve runs in one): an exception group of one."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _exit_code(raised: BaseException, exc: BaseException) -> int:
    if isinstance(exc, ConfigError):
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    if isinstance(exc, GatewayError):
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if isinstance(exc, KeyboardInterrupt):
        return 130
    raise raised  # a bug: the whole traceback


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicom-gateway", description=__doc__)
    parser.add_argument("--version", action="version", version=f"dicom-gateway {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser("serve", help="run the gateway until SIGTERM/SIGINT")
    _config_option(serve)
    serve.set_defaults(func=cmd_serve)

    config = commands.add_parser("config", help="configuration tools")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    show = config_commands.add_parser("show", help="print the effective settings as YAML")
    _config_option(show)
    show.set_defaults(func=cmd_config_show)

    demo = commands.add_parser("demo", help="run the gateway with simulated Test/Prod PACS and RIS")
    demo.add_argument("--data-dir", type=Path, default=Path("var/demo"),
                      help="where the demo keeps its spool and the PACS folders (default var/demo)")
    demo.add_argument("--port", type=int, default=11112,
                      help="gateway DICOM port; the simulators use the next three")
    demo.add_argument("--http-port", type=int, default=8080)
    demo.set_defaults(func=cmd_demo)

    add_rules_commands(commands)
    cli_queue.add_queue_commands(commands, _config_option)

    echo = commands.add_parser("echo", help="C-ECHO one destination (or 'worklist')")
    echo.add_argument("name")
    _config_option(echo)
    echo.set_defaults(func=cmd_echo)

    doctor = commands.add_parser("doctor", help="check every destination and the RIS")
    _config_option(doctor)
    doctor.set_defaults(func=cmd_doctor)
    return parser


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML configuration file (default: $DICOMGW_CONFIG, else defaults)")


# ------------------------------------------------------------------------------------- serve


def cmd_serve(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    logs.configure(settings.log_format, settings.log_level)
    anyio.run(serve, settings)
    return 0


async def serve(settings: Settings) -> None:
    gateway = Gateway(settings)
    async with anyio.create_task_group() as tg:
        tg.start_soon(_signals, gateway)
        await gateway.run()
        tg.cancel_scope.cancel()


async def _signals(gateway: Gateway) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as received:
        async for signum in received:
            if signum == signal.SIGHUP:
                await gateway.reload_rules()
            else:
                gateway.stop()


def cmd_config_show(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    print(yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False), end="")
    return 0


# ------------------------------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    logs.configure("text", "INFO")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_demo(args.data_dir, args.port, args.http_port))
    return 0


# ------------------------------------------------------------------------------------- peers


def cmd_echo(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    peer, key = _peer(settings, args.name)
    result = anyio.run(lambda: echo_peer(args.name, peer, settings.ae_title, config_key=key))
    print(result.message)
    return 0 if result.ok else 1


def _peer(settings: Settings, name: str) -> tuple[Peer, str]:
    if name == "worklist":
        if settings.worklist is None:
            raise ConfigError("no worklist is configured (add a 'worklist:' section)")
        return settings.worklist, "worklist"
    if name not in settings.destinations:
        known = ", ".join([*settings.destinations, "worklist"]) or "none"
        raise ConfigError(f"no destination named {name!r}; configured: {known}")
    return settings.destinations[name], f"destinations.{name}"


def cmd_doctor(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    return anyio.run(run_doctor, settings)


if __name__ == "__main__":
    raise SystemExit(main())
