"""The ``auditpipe`` command line.

    auditpipe dev [--sink NAME] [--config FILE] [--requests N]   the whole pipeline, embedded
    auditpipe process [--config FILE]                              a processor worker
    auditpipe sink NAME [--config FILE] | auditpipe sink --list   a sink consumer
    auditpipe sink NAME --migrate [--config FILE]                  create the sink's tables
    auditpipe broker [--port PORT]                                 the embedded broker alone

Exit codes: 0 success, 1 the job failed (the message says what is missing), 2 bad usage or
configuration (the message names the key), 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from .errors import AuditpipeError, ConfigError
from .settings import Settings, load_settings, settings_path_from_env


def _settings(args: argparse.Namespace) -> Settings:
    path = args.config or settings_path_from_env()
    return load_settings(path)


def _origin(args: argparse.Namespace) -> str:
    return str(args.config or settings_path_from_env() or "settings")


def cmd_dev(args: argparse.Namespace) -> int:
    from .dev import DevOptions, run_dev

    settings = _settings(args)
    options = DevOptions(
        sink=args.sink,
        requests=args.requests,
        timeout_secs=args.timeout,
        concurrency=args.concurrency,
        port=args.port,
        rate_per_sec=args.rate,
        config_path=args.config,
        origin=_origin(args),
    )
    return asyncio.run(run_dev(settings, options))


def cmd_process(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from .kafka import require_bootstrap

    require_bootstrap(settings.kafka)
    try:
        from auditpipe.processors.app import run_worker
    except ImportError as exc:
        raise ConfigError(
            f"the processor worker needs faust-streaming ({exc}): "
            "pip install 'auditpipe[processors]'"
        ) from None
    run_worker(settings, loglevel=args.loglevel)
    return 0


def cmd_sink(args: argparse.Namespace) -> int:
    from auditpipe.sinks import available_sinks, create_sink

    if args.list:
        for name, target in sorted(available_sinks().items()):
            print(f"{name}\t{target}")
        return 0
    if not args.name:
        raise ConfigError("auditpipe sink: name a sink (see `auditpipe sink --list`)")
    settings = _settings(args)
    if args.migrate:
        sink = create_sink(args.name, settings.sinks, _origin(args))
        migrate = getattr(sink, "migrate", None)
        if migrate is None:
            raise ConfigError(f"sink {args.name!r} has nothing to migrate")
        asyncio.run(migrate())
        print(f"sink {args.name}: schema is up to date", file=sys.stderr)
        return 0
    from .kafka import require_bootstrap

    require_bootstrap(settings.kafka)
    sink = create_sink(args.name, settings.sinks, _origin(args))
    return asyncio.run(_run_sink(sink, settings))


async def _run_sink(sink: object, settings: Settings) -> int:
    from auditpipe.sinks.runner import SinkRunner

    runner = SinkRunner(sink, settings)  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, runner.stop)
    await runner.run()
    print(f"sink {runner.sink.name} stopped: {runner.snapshot()}", file=sys.stderr)
    return 0


def cmd_broker(args: argparse.Namespace) -> int:
    from .broker import EmbeddedBroker

    broker = EmbeddedBroker(port=args.port)
    broker.start()
    print(broker.bootstrap, flush=True)
    print(f"embedded broker on {broker.bootstrap} (log: {broker.log_path}); Ctrl-C stops it",
          file=sys.stderr)  # fmt: skip
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        broker.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="auditpipe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-level", default="WARNING", help="log level for stderr (WARNING)")
    sub = parser.add_subparsers(dest="command", required=True)

    dev = sub.add_parser("dev", help="run broker, processor, sink and a demo server, send traffic")
    dev.add_argument("--sink", default="stdout", help="sink to deliver to (default: stdout)")
    dev.add_argument("--config", help="settings file (TOML); [sinks.NAME] configures the sink")
    dev.add_argument("--requests", type=int, help="send N requests, wait for N events, exit")
    dev.add_argument("--timeout", type=float, default=120.0,
                     help="with --requests: seconds to wait for delivery (120)")  # fmt: skip
    dev.add_argument("--concurrency", type=int, default=4, help="parallel requests (4)")
    dev.add_argument("--rate", type=float, default=2.0,
                     help="without --requests: requests per second until Ctrl-C (2)")  # fmt: skip
    dev.add_argument("--port", type=int, help="demo server port (default: a free one)")
    dev.set_defaults(func=cmd_dev)

    proc = sub.add_parser("process", help="run a processor worker (Faust)")
    proc.add_argument("--config", help="settings file (TOML)")
    proc.add_argument("--loglevel", default="warning", help="worker log level (warning)")
    proc.set_defaults(func=cmd_process)

    sink = sub.add_parser("sink", help="run a sink consumer, or list installed sinks")
    sink.add_argument("name", nargs="?", help="sink name (see --list)")
    sink.add_argument("--list", action="store_true", help="list installed sinks and exit")
    sink.add_argument("--config", help="settings file (TOML); [sinks.NAME] configures the sink")
    sink.add_argument("--migrate", action="store_true",
                      help="create or update the sink's tables/schema, then exit")  # fmt: skip
    sink.set_defaults(func=cmd_sink)

    broker = sub.add_parser("broker", help="run the embedded Kafka-compatible broker alone")
    broker.add_argument("--port", type=int, help="port on 127.0.0.1 (default: a free one)")
    broker.set_defaults(func=cmd_broker)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"auditpipe: configuration error: {exc}", file=sys.stderr)
        return 2
    except AuditpipeError as exc:
        print(f"auditpipe: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
