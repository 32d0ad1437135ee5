"""The ``auditpipe`` command line.

    auditpipe dev [--sink NAME] [--config FILE] [--requests N]   the whole pipeline, embedded
    auditpipe process [--config FILE]                              a processor worker
    auditpipe sink NAME [--config FILE] | auditpipe sink --list   a sink consumer
    auditpipe redact [--config FILE] [INPUT|-] [-o OUTPUT|-] [--rejects FILE]
    auditpipe sink NAME --migrate [--config FILE]                  create the sink's tables
    auditpipe broker [--port PORT]                                 the embedded broker alone
    auditpipe topics [--config FILE] [--create]                    show/create the topics
    auditpipe demo [--config FILE] [--requests N|--rate R]         demo server + traffic
    auditpipe proxy --upstream URL [--host H] [--port P] [--config FILE]  auditing reverse proxy
    auditpipe ingest [--config FILE] [--follow] [--state FILE] [FILE ...|-]  audit JSONL in
    auditpipe receive [--host H] [--port P] [--config FILE]       KServe logger receiver
    auditpipe schemas compat OLD.avsc [OLD...] NEW.avsc [--mode M] can NEW follow OLD?
    auditpipe schemas check [--dir DIR]                            every version, FULL_TRANSITIVE
    auditpipe schemas register [--config FILE]                     publish them to [registry] url
    auditpipe serve [--config FILE] [--host H] [--port P]          stored-completions API, viewer
    auditpipe export [--config FILE] [--format chat|records] ...   stored records as JSONL
    auditpipe erase [--config FILE] (--user ID | ...) [--dry-run] [--yes]  erase a subject
    auditpipe retention [--config FILE] [--apply]                 what ages out per sink
    auditpipe soak [--seconds S] [--rate RPS] [--faults LIST] [--json]  load + faults + account

Exit codes: 0 success, 1 the job failed (the message says what is missing), 2 bad usage or
configuration (the message names the key), 3 `redact` rejected some lines (`ingest`: skipped
malformed records), 4 `erase`/`retention` kept some records (the receipt says why), 5 `erase`
refused (not confirmed), 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .errors import AuditpipeError, ConfigError
from .settings import Settings, load_settings, settings_path_from_env, validate_model

if TYPE_CHECKING:
    from auditpipe.sinks import Sink

#: Commands that run until stopped log at INFO unless [logging] level says otherwise.
LONG_RUNNING = frozenset({"process", "sink", "broker", "proxy", "receive", "serve", "demo"})


def _default_level(args: argparse.Namespace) -> str:
    long_running = args.command in LONG_RUNNING or (
        args.command == "ingest" and getattr(args, "follow", False)
    )
    if args.command == "sink" and (args.list or args.migrate):
        long_running = False
    # Faust's and mode's INFO is a Starting/Stopping line per internal service: noise by default
    return "info,faust=warning,mode=warning" if long_running else "warning"


def _level_override(args: argparse.Namespace) -> str | None:
    return args.log_level or getattr(args, "loglevel", None)


def _settings(args: argparse.Namespace) -> Settings:
    """The settings, and auditpipe's logging set up from their ``[logging]`` table."""
    from . import logs

    path = args.config or settings_path_from_env()
    settings = load_settings(path)
    logs.setup(settings.logging, _default_level(args), _level_override(args))
    return settings


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
    from .kafka import preflight

    asyncio.run(preflight(settings.kafka))  # bootstrap, certificates, CA: fail here, by key
    try:
        from auditpipe.processors.app import run_worker
    except ImportError as exc:
        raise ConfigError(
            f"the processor worker needs faust-streaming ({exc}): "
            "pip install 'auditpipe[processors]'"
        ) from None
    run_worker(settings)
    return 0


def cmd_sink(args: argparse.Namespace) -> int:
    from auditpipe.sinks import Migratable, available_sinks, create_sink

    if args.list:
        for name, target in sorted(available_sinks().items()):
            print(f"{name}\t{target}")
        return 0
    if not args.name:
        raise ConfigError("auditpipe sink: name a sink (see `auditpipe sink --list`)")
    settings = _settings(args)
    if args.migrate:
        sink = create_sink(args.name, settings.sinks, _origin(args))
        if not isinstance(sink, Migratable):
            raise ConfigError(f"sink {args.name!r} has nothing to migrate")
        asyncio.run(sink.migrate())
        print(f"sink {args.name}: schema is up to date", file=sys.stderr)
        return 0
    from .kafka import preflight

    asyncio.run(preflight(settings.kafka))  # bootstrap, certificates, CA: fail here, by key
    sink = create_sink(args.name, settings.sinks, _origin(args))
    return asyncio.run(_run_sink(sink, settings))


async def _run_sink(sink: Sink[Any], settings: Settings) -> int:
    from auditpipe.sinks.runner import SinkRunner

    runner = SinkRunner(sink, settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, runner.stop)
    await runner.run()
    print(f"sink {runner.sink.name} stopped: {runner.snapshot()}", file=sys.stderr)
    return 0


def cmd_redact(args: argparse.Namespace) -> int:
    """Run the configured processor chain offline over a JSONL file; see processors/offline.py."""
    from auditpipe.processors import chain_for
    from auditpipe.processors.offline import run_offline

    settings = _settings(args)
    chain = chain_for(settings.pipeline, _origin(args))  # bad config fails before any I/O
    with contextlib.ExitStack() as stack:
        src = (
            sys.stdin.buffer
            if args.input in (None, "-")
            else stack.enter_context(_open(args.input, "rb"))
        )
        out = (
            sys.stdout.buffer
            if args.output in (None, "-")
            else stack.enter_context(_open(args.output, "wb"))
        )
        rejects = (
            sys.stderr.buffer
            if not args.rejects
            else stack.enter_context(_open(args.rejects, "wb"))
        )
        report = run_offline(chain, src, out, rejects)
    print(f"[auditpipe redact] {report.summary()}", file=sys.stderr)
    return 3 if report.rejected else 0


def _open(path: str, mode: str) -> Any:
    try:
        return open(path, mode)
    except OSError as exc:
        raise ConfigError(f"cannot open {path}: {exc.strerror}") from None


def cmd_broker(args: argparse.Namespace) -> int:
    """The embedded broker with the pipeline's topics, until SIGINT/SIGTERM."""
    from .broker import EmbeddedBroker
    from .kafka import ensure_topics

    settings = _settings(args)
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)  # delivered to sigwait below
    broker = EmbeddedBroker(port=args.port)
    broker.start()
    try:
        kafka = settings.kafka.model_copy(update={"bootstrap": broker.bootstrap})
        asyncio.run(ensure_topics(kafka))
        print(broker.bootstrap, flush=True)
        print(
            f"embedded broker on {broker.bootstrap} with topics {kafka.raw_topic}, "
            f"{kafka.events_topic}, {kafka.dlq_topic} (log: {broker.log_path}); Ctrl-C stops it",
            file=sys.stderr,
        )
        signal.sigwait(stop_signals)
    finally:
        broker.stop()
    return 0


def _override(settings: Settings, table: str, **values: Any) -> None:
    """Command-line options over ``[table]`` (those given); invalid ones name the key."""
    updates = {k: v for k, v in values.items() if v is not None}
    if updates:
        current = getattr(settings, table)
        merged = {**current.model_dump(), **updates}
        setattr(settings, table, validate_model(type(current), merged, "command line", table))


def cmd_proxy(args: argparse.Namespace) -> int:
    """The auditing reverse proxy in front of ``--upstream`` (see producer/proxy.py)."""
    settings = _settings(args)
    _override(settings, "proxy", upstream=args.upstream, host=args.host, port=args.port)
    cfg = settings.proxy
    if not cfg.upstream:
        raise ConfigError(
            "proxy.upstream is not set: pass --upstream http://HOST:PORT (or [proxy] upstream in "
            "the settings file, or AUDITPIPE_PROXY_UPSTREAM)"
        )
    try:
        from auditpipe.producer import AuditMiddleware, AuditProducer, _serve
        from auditpipe.producer.proxy import ProxyApp
    except ImportError as exc:
        raise ConfigError(
            f"the proxy needs aiohttp and uvicorn ({exc}): pip install 'auditpipe[proxy]'"
        ) from None
    sock = _serve.bind(cfg.host, cfg.port)
    producer = AuditProducer(settings)
    proxy = ProxyApp(cfg.upstream, cfg)
    from .metrics import RequestMetrics, make_registry, producer_stage, proxy_stage

    app = RequestMetrics(AuditMiddleware(proxy, producer), "proxy")  # requests, status, latency
    registry = make_registry(app.source(), proxy_stage(proxy), producer_stage(producer))[0]
    return _serve.run(
        registry=registry,
        metrics=settings.metrics,
        app=app,
        producer=producer,
        sock=sock,
        banner=f"auditpipe proxy: listening on {{url}}, forwarding to {cfg.upstream} "
        f"(capture: {settings.producer.capture}, transport: {settings.producer.transport})",
        on_stop=lambda: f"proxy: {dict(proxy.stats)}",
    )


def cmd_ingest(args: argparse.Namespace) -> int:
    """Dynamo-style audit JSONL from files or stdin (see producer/ingest.py)."""
    from auditpipe.producer.ingest import run_ingest

    settings = _settings(args)
    return run_ingest(settings, args.files, follow=args.follow, state_file=args.state,
                      use_state=not args.no_state)  # fmt: skip


def cmd_receive(args: argparse.Namespace) -> int:
    """The KServe inference-logger receiver (see producer/kserve.py)."""
    settings = _settings(args)
    _override(settings, "receiver", host=args.host, port=args.port)
    cfg = settings.receiver
    try:
        from auditpipe.producer import AuditProducer, _serve
        from auditpipe.producer.kserve import KServeReceiver
    except ImportError as exc:
        raise ConfigError(
            f"the receiver needs uvicorn ({exc}): pip install 'auditpipe[proxy]'"
        ) from None
    sock = _serve.bind(cfg.host, cfg.port)
    producer = AuditProducer(settings)
    receiver = KServeReceiver(producer, cfg)
    return _serve.run(
        registry=receiver.metrics_registry(),
        metrics=settings.metrics,
        app=receiver,
        producer=producer,
        sock=sock,
        banner="auditpipe receive: KServe logger CloudEvents on {url} (pair timeout "
        f"{cfg.pair_timeout_secs:g} s, transport: {settings.producer.transport})",
        on_stop=lambda: f"receiver: {receiver.snapshot()}",
    )


def cmd_schemas_compat(args: argparse.Namespace) -> int:
    """Exit 0 compatible, 1 not (each problem printed with its path), 2 unreadable schema."""
    from auditpipe.schemas import compat

    if len(args.files) < 2:
        print("auditpipe schemas compat: give OLD.avsc [OLD...] NEW.avsc", file=sys.stderr)
        return 2
    try:
        schemas = [compat.load(path) for path in args.files]
        mode = compat.Mode(args.mode.upper())
    except compat.SchemaError as exc:
        print(f"auditpipe: invalid schema: {exc}", file=sys.stderr)
        return 2
    *old, new = schemas
    problems = compat.check(new, old, mode)
    for p in problems:
        print(f"{p} (reader {p.reader}, writer {p.writer})")
    olds = ", ".join(s.source for s in old)
    if problems:
        print(f"{new.source} is NOT {mode} compatible with {olds}", file=sys.stderr)
        return 1
    print(f"{new.source} is {mode} compatible with {olds}", file=sys.stderr)
    return 0


def cmd_schemas_check(args: argparse.Namespace) -> int:
    """Every version in registry.json against all earlier ones under FULL_TRANSITIVE."""
    from auditpipe.schemas import compat
    from auditpipe.schemas.registry import FileRegistry

    try:
        registry = FileRegistry(args.dir)
    except compat.SchemaError as exc:
        print(f"auditpipe: invalid schema registry: {exc}", file=sys.stderr)
        return 2
    problems = registry.check(compat.Mode.FULL_TRANSITIVE)
    for p in problems:
        print(f"{p} (reader {p.reader}, writer {p.writer})")
    listing = ", ".join(f"v{v.version}=id {v.id}" for v in registry.versions)
    verdict = "NOT FULL_TRANSITIVE compatible" if problems else "FULL_TRANSITIVE compatible"
    print(f"{registry.subject} ({listing}): {verdict}", file=sys.stderr)
    return 1 if problems else 0


def cmd_schemas_register(args: argparse.Namespace) -> int:
    """Register every file version under ``[registry] subject`` at ``[registry] url``."""
    from auditpipe.schemas.registry import ConfluentRegistry, FileRegistry

    settings = _settings(args)
    reg = settings.registry
    if not reg.url:
        raise ConfigError(
            f"{_origin(args)}: [registry] url is not set (the file registry needs no registering)"
        )
    files = FileRegistry()
    registry = ConfluentRegistry.from_url(reg.url, reg.subject)
    ids = registry.sync(files, reg.compatibility)  # RegistryError (exit 1) names what failed
    for v in files.versions:
        print(f"{reg.subject} version {v.version} ({v.file}): id {ids[v.id]}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """OpenAI's stored chat completions API and the web viewer over the postgres sink's tables."""
    from auditpipe.api.serve import run_serve

    settings = _settings(args)
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if overrides:
        serve = settings.serve.model_copy(update=overrides)
        settings = settings.model_copy(update={"serve": serve})
    return run_serve(settings, _origin(args))


def cmd_export(args: argparse.Namespace) -> int:
    """Stored records as JSONL (chat fine-tuning format or audit records), streamed."""
    import os

    from auditpipe.api.export import ExportOptions, run_export
    from auditpipe.api.serve import database, parse_pairs, postgres_config
    from auditpipe.api.timeparse import TimeParseError, parse_time

    settings = _settings(args)
    config = postgres_config(settings, _origin(args))
    times = {}
    for name in ("since", "until"):
        value = getattr(args, name)
        try:
            times[name] = parse_time(value) if value else None
        except TimeParseError as exc:
            raise ConfigError(f"--{name}: {exc}") from None
    if args.limit is not None and args.limit < 0:
        raise ConfigError(f"--limit must be >= 0, got {args.limit}")
    options = ExportOptions(
        format=args.format,
        model=args.model,
        metadata=parse_pairs(args.metadata, "--metadata"),
        since=times["since"],
        until=times["until"],
        limit=args.limit,
    )

    def progress(message: str) -> None:
        print(f"[auditpipe export] {message}", file=sys.stderr, flush=True)

    to_stdout = args.output in (None, "-")
    partial = None if to_stdout else f"{args.output}.partial"
    with contextlib.ExitStack() as stack:
        dsn = stack.enter_context(database(config))
        out = sys.stdout.buffer if to_stdout else stack.enter_context(_open(str(partial), "wb"))
        try:
            report = run_export(dsn, config, options, out, progress)
        except BrokenPipeError:  # `| head`: the reader has what it wanted
            with contextlib.suppress(OSError):
                sys.stdout = open(os.devnull, "w")  # no flush error at exit
            return 0
        except BaseException:
            if partial is not None:
                with contextlib.suppress(OSError):
                    os.unlink(partial)
            raise
    if partial is not None:
        os.replace(partial, args.output)
    where = "stdout" if to_stdout else args.output
    progress(f"{report.summary()} -> {where} ({args.format})")
    return 0


def cmd_topics(args: argparse.Namespace) -> int:
    """The pipeline's topics: partitions and retention; ``--create`` creates the missing ones."""
    from .kafka import admin_client, create_missing_topics, describe_topics

    settings = _settings(args)

    async def run() -> tuple[list[str], list[Any]]:
        async with admin_client(settings.kafka) as admin:
            created = await create_missing_topics(admin, settings.kafka) if args.create else []
            return created, await describe_topics(admin, settings.kafka)

    created, topics = asyncio.run(run())
    print(f"{'TOPIC':<32} {'ROLE':<7} {'PARTITIONS':>10} {'RETENTION':>12}  NOTE")
    for t in topics:
        note = "created" if t.name in created else ""
        if not t.exists:
            note = "missing (auditpipe topics --create creates it)"
        elif t.wanted_retention_ms is not None and t.retention_ms not in (
            None,
            t.wanted_retention_ms,
        ):
            note = f"retention differs from [kafka] {t.role}_retention_secs"
        parts = str(t.partitions) if t.exists else "-"
        print(f"{t.name:<32} {t.role:<7} {parts:>10} {_duration(t.retention_ms):>12}  {note}")
    missing = [t.name for t in topics if not t.exists]
    return 1 if missing else 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The demo server with the audit hook, sending itself traffic with the openai client."""
    settings = _settings(args)
    try:
        import openai  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"auditpipe demo needs {exc.name}: pip install 'auditpipe[demo]'"
        ) from None
    from .demo_traffic import DemoOptions, run_demo

    options = DemoOptions(
        host=args.host,
        port=args.port,
        requests=args.requests,
        rate_per_sec=args.rate,
        concurrency=args.concurrency,
    )
    return asyncio.run(run_demo(settings, options))


def _duration(ms: int | None) -> str:
    if ms is None:
        return "-"
    if ms < 0:
        return "forever"
    secs = ms // 1000
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size and secs % size == 0:
            return f"{secs // size}{unit}"
    return f"{secs}s" if ms % 1000 == 0 else f"{ms}ms"


def cmd_soak(args: argparse.Namespace) -> int:
    """Traffic, faults on a schedule and an exact account (see auditpipe/soak.py)."""
    import json

    from .soak import SoakOptions, human_summary, parse_faults, run_soak

    for name in ("seconds", "rate", "fault_every", "fault_secs"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.concurrency < 1:
        raise ConfigError(f"--concurrency must be >= 1, got {args.concurrency}")
    settings = _settings(args)
    options = SoakOptions(
        seconds=args.seconds,
        rate=args.rate,
        concurrency=args.concurrency,
        sink=args.sink,
        faults=parse_faults(args.faults),
        fault_every=args.fault_every,
        fault_secs=args.fault_secs,
        drain_secs=args.drain_secs,
        workers=not args.no_workers,
        workdir=args.workdir,
        config_path=args.config,
        origin=_origin(args),
        seed=args.seed,
    )
    code, summary = asyncio.run(run_soak(settings, options))
    print(human_summary(summary), file=sys.stderr if args.json else sys.stdout, flush=True)
    if args.json:
        print(json.dumps(summary, sort_keys=True), flush=True)
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="auditpipe", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--log-level",
        help="log levels, e.g. info,auditpipe.sinks=debug (default: [logging] level, or "
        "AUDITPIPE_LOG; info for long-running commands, warning for the others)",
    )
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
    proc.add_argument("--loglevel", help="same as auditpipe --log-level (kept for old scripts)")
    proc.set_defaults(func=cmd_process)

    sink = sub.add_parser("sink", help="run a sink consumer, or list installed sinks")
    sink.add_argument("name", nargs="?", help="sink name (see --list)")
    sink.add_argument("--list", action="store_true", help="list installed sinks and exit")
    sink.add_argument("--config", help="settings file (TOML); [sinks.NAME] configures the sink")
    sink.add_argument("--migrate", action="store_true",
                      help="create or update the sink's tables/schema, then exit")  # fmt: skip
    sink.set_defaults(func=cmd_sink)

    redact = sub.add_parser(
        "redact",
        help="run the configured processor chain over a JSONL file of audit records",
        description="One line out per line in (unless sampled out). Exit 3 when lines were "
        "rejected (written to --rejects, or stderr, with their line numbers).",
    )
    redact.add_argument("input", nargs="?", help="JSONL input (default: stdin, or -)")
    redact.add_argument("-o", "--output", help="JSONL output (default: stdout, or -)")
    redact.add_argument("--rejects", help="where malformed lines go (default: stderr)")
    redact.add_argument("--config", help="settings file (TOML); [pipeline] configures the steps")
    redact.set_defaults(func=cmd_redact)

    broker = sub.add_parser("broker", help="run the embedded Kafka-compatible broker alone")
    broker.add_argument("--port", type=int, help="port on 127.0.0.1 (default: a free one)")
    broker.add_argument("--config", help="settings file (TOML); [kafka] names the topics")
    broker.set_defaults(func=cmd_broker)

    proxy = sub.add_parser(
        "proxy",
        help="auditing reverse proxy in front of any inference server (vLLM, TGI, Dynamo...)",
        description="Forwards every request to --upstream unchanged (streams both ways) and "
        "captures exchanges like AuditMiddleware, per [producer]. SIGTERM: finish requests, "
        "flush, exit.",
    )
    proxy.add_argument("--upstream", help="the server's base URL, e.g. http://127.0.0.1:8000")
    proxy.add_argument("--host", help="listen address (default: [proxy] host, 127.0.0.1)")
    proxy.add_argument("--port", type=int, help="listen port (default: [proxy] port, 8080)")
    proxy.add_argument("--config", help="settings file (TOML); [proxy] and [producer]")
    proxy.set_defaults(func=cmd_proxy)

    ingest = sub.add_parser(
        "ingest",
        help="publish audit JSONL (Dynamo's store=true records) from files or stdin",
        description="Takes the audit records out of a server's output (other log lines are "
        "skipped and counted, or dead-lettered by [ingest] settings) and publishes them as "
        "AuditEvents. Files resume from the positions in the state file. Exit 3 when "
        "malformed records were skipped.",
    )
    ingest.add_argument("files", nargs="*", metavar="FILE",
                        help="files to read; - or none: stdin")  # fmt: skip
    ingest.add_argument("--follow", "-F", action="store_true",
                        help="keep reading like tail -F (rotation, truncation)")  # fmt: skip
    ingest.add_argument("--state", help="state file (default: [ingest] state_file, or one under "
                        "$XDG_STATE_HOME/auditpipe)")  # fmt: skip
    ingest.add_argument("--no-state", action="store_true",
                        help="read files from their start and remember nothing")  # fmt: skip
    ingest.add_argument("--config", help="settings file (TOML); [ingest] and [producer]")
    ingest.set_defaults(func=cmd_ingest)

    receive = sub.add_parser(
        "receive",
        help="receive KServe inference-logger CloudEvents, pair request and response",
        description="Point an InferenceService's logger (mode: all) at this URL. Answers 202 "
        "at once; pairs request and response by ce-id; a half left alone past "
        "[receiver] pair_timeout_secs is recorded as incomplete.",
    )
    receive.add_argument("--host", help="listen address (default: [receiver] host, 127.0.0.1)")
    receive.add_argument("--port", type=int, help="listen port (default: [receiver] port, 8081)")
    receive.add_argument("--config", help="settings file (TOML); [receiver] and [producer]")
    receive.set_defaults(func=cmd_receive)
    serve = sub.add_parser(
        "serve",
        help="OpenAI-compatible stored chat completions API and web viewer over the postgres sink",
        description="Serves GET/POST/DELETE /v1/chat/completions[/ID[/messages]] as OpenAI does "
        "and a web viewer at /. Without [sinks.postgres] dsn it uses the embedded PostgreSQL "
        "in ./.auditpipe/postgres. Keys: [serve] api_keys (read and write), read_api_keys.",
    )
    serve.add_argument("--config", help="settings file (TOML): [serve], [sinks.postgres]")
    serve.add_argument("--host", help="address to listen on (default [serve] host, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default [serve] port, 8088; 0: any free)")
    serve.set_defaults(func=cmd_serve)

    export = sub.add_parser(
        "export",
        help="write stored records as JSONL: chat datasets or audit records",
        description="chat: one {messages, metadata} per stored chat completion, the answer "
        "last; records: the audit records. Times: ISO-8601 (2026-12-01, 2026-12-01T10:00Z) or "
        "relative (90s, 15m, 2h, 7d, 2w), now, today, yesterday. Progress goes to stderr.",
    )
    export.add_argument("--config", help="settings file (TOML): [sinks.postgres]")
    export.add_argument("--model", help="only records whose request named this model")
    export.add_argument(
        "--metadata",
        action="append",
        metavar="KEY=VALUE",
        help="only records with this metadata pair (repeatable; all must match)",
    )
    export.add_argument("--since", help="only records captured at or after this time")
    export.add_argument("--until", help="only records captured before this time")
    export.add_argument("--format", choices=["chat", "records"], default="chat",
                        help="chat (fine-tuning/evals format, default) or records")  # fmt: skip
    export.add_argument("--limit", type=int, help="at most this many rows")
    export.add_argument("-o", "--output", help="output file (default: stdout, or -)")
    export.set_defaults(func=cmd_export)

    topics = sub.add_parser(
        "topics",
        help="show the pipeline's topics (partitions, retention); --create creates missing ones",
        description="Lists raw, events and dlq ([kafka] *_topic) and every other topic on the "
        "cluster with partitions and retention. --create creates the missing pipeline topics "
        "with [kafka] partitions, replication_factor and *_retention_secs (existing ones are "
        "left alone). Exit 1 when a pipeline topic is missing.",
    )
    topics.add_argument("--config", help="settings file (TOML): [kafka]")
    topics.add_argument("--create", action="store_true", help="create missing pipeline topics")
    topics.set_defaults(func=cmd_topics)

    demo = sub.add_parser(
        "demo",
        help="run the demo OpenAI-compatible server with the audit hook and send it traffic",
        description="What `auditpipe dev` runs in front of its pipeline, alone: the events go "
        "to [kafka] raw_topic (or stdout with [producer] transport = stdout). Traffic: the "
        "official openai client against this server's loopback address.",
    )
    demo.add_argument("--config", help="settings file (TOML): [kafka], [producer]")
    demo.add_argument("--host", default="127.0.0.1", help="listen address (127.0.0.1)")
    demo.add_argument("--port", type=int, default=8000, help="listen port (8000; 0: any free)")
    demo.add_argument(
        "--requests", type=int, help="send N requests, flush, exit (0: serve only, no traffic)"
    )
    demo.add_argument(
        "--rate", type=float, default=1.0, help="without --requests: requests/s until SIGTERM (1)"
    )
    demo.add_argument("--concurrency", type=int, default=4, help="parallel requests (4)")
    demo.set_defaults(func=cmd_demo)
    soak = sub.add_parser(
        "soak",
        help="steady traffic through the pipeline, faults on a schedule, an exact account",
        description="Drives the demo server (with the audit hook) with the openai client, "
        "injects faults (broker cut, kill -9 of processor and sink, store unwritable, spool "
        "disk full), then counts every event by soak id in the store. Exit 0 only when nothing "
        "was lost. See docs/soak.md.",
    )
    soak.add_argument("--config", help="settings file (TOML); [kafka], [sinks.NAME], [producer]")
    soak.add_argument("--seconds", type=float, default=60.0, help="traffic duration (60)")
    soak.add_argument("--rate", type=float, default=10.0, help="requests per second (10)")
    soak.add_argument("--concurrency", type=int, default=8, help="requests in flight at most (8)")
    soak.add_argument("--sink", default="file", help="sink to deliver to and read back (file)")
    soak.add_argument("--faults", default="all",
                      help="all, none, or a list: broker,processor,sink,store,disk")  # fmt: skip
    soak.add_argument("--fault-every", type=float, default=30.0,
                      help="seconds between fault starts (30)")  # fmt: skip
    soak.add_argument("--fault-secs", type=float, default=10.0,
                      help="how long each fault lasts (10)")  # fmt: skip
    soak.add_argument("--drain-secs", type=float, default=120.0,
                      help="longest wait for the pipeline to drain (120)")  # fmt: skip
    soak.add_argument("--no-workers", action="store_true",
                      help="start no processor or sink (the deployment's do the work)")  # fmt: skip
    soak.add_argument("--workdir", help="keep logs, spool and the file store here")
    soak.add_argument("--seed", type=int, help="seed of the traffic mix (default: random)")
    soak.add_argument("--json", action="store_true",
                      help="the summary as one JSON line last on stdout")  # fmt: skip
    soak.set_defaults(func=cmd_soak)

    from auditpipe.schemas.compat import Mode

    schemas = sub.add_parser("schemas", help="schema versions and compatibility")
    schemas_sub = schemas.add_subparsers(dest="schemas_command", required=True)
    compat = schemas_sub.add_parser(
        "compat", help="check that the last schema file can follow the earlier ones"
    )
    compat.add_argument("files", nargs="+", metavar="FILE.avsc",
                        help="previous version(s), oldest first, then the new one")  # fmt: skip
    compat.add_argument(
        "--mode",
        default="backward",
        type=str.upper,
        choices=[m.value for m in Mode],
        help="Confluent compatibility type (default: BACKWARD)",
    )
    compat.set_defaults(func=cmd_schemas_compat)
    check = schemas_sub.add_parser(
        "check", help="verify every version in registry.json under FULL_TRANSITIVE"
    )
    check.add_argument("--dir", help="directory with registry.json (default: the installed one)")
    check.set_defaults(func=cmd_schemas_check)
    register = schemas_sub.add_parser(
        "register", help="register every version at the Confluent Schema Registry of [registry]"
    )
    register.add_argument("--config", help="settings file (TOML) with a [registry] table")
    register.set_defaults(func=cmd_schemas_register)

    from .privacy.cli import add_commands as add_privacy_commands  # erase, retention

    add_privacy_commands(sub, _settings, _origin)
    return parser


def _early_logging(args: argparse.Namespace) -> None:
    """Logging before the settings are read (commands without settings keep this one)."""
    import os

    from pydantic import ValidationError

    from . import logs
    from .settings import LoggingSettings

    override = _level_override(args)
    if override is not None:
        try:
            logs.parse_level_spec(override)
        except ValueError as exc:
            raise ConfigError(f"--log-level: {exc}") from None
    env = os.environ
    try:  # the environment's [logging] already; a bad value is reported when settings load
        config = LoggingSettings(
            level=env.get("AUDITPIPE_LOGGING_LEVEL", env.get("AUDITPIPE_LOG")) or None,
            format=env.get("AUDITPIPE_LOGGING_FORMAT", env.get("AUDITPIPE_LOG_FORMAT", "text")),
        )
    except ValidationError:
        config = None
    logs.setup(config, _default_level(args), override)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _early_logging(args)
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
