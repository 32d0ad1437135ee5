"""``auditpipe erase``, ``auditpipe retention`` and ``auditpipe decrypt``.

    auditpipe erase [--config FILE] (--user ID | --tenant ID | --request-id ID | --event-id ID
                    | --metadata K=V ...) [--since T] [--until T] [--sink NAME ...] [--dry-run]
                    [--yes] [--reason TEXT] [--operator NAME] [--override-retention] [--json]
    auditpipe retention [--config FILE] [--sink NAME ...] [--apply] [--json]
    auditpipe decrypt [--config FILE] [PATH ...]      (JSONL, .gz too; - or none: stdin)

Exit codes (erase): 0 every selected record erased (or, with --dry-run, counted); 1 a store
failed or the erasure event could not be sent (the receipt says which); 2 bad usage or
configuration; 4 partial: records were kept (younger than min_retention_days, under S3 Object
Lock), the receipt says why; 5 refused (no --yes and no terminal to ask on, or not confirmed).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Mapping
from typing import Any

import orjson

from auditpipe.errors import AuditpipeError, ConfigError
from auditpipe.settings import Settings

from . import shredding
from .erasure import (
    DAY_MS,
    Receipt,
    erasable_stores,
    erase_everywhere,
    erasure_event,
    hash_key,
    operator_name,
    retention_reason,
)
from .selector import Kind, Selector

EXIT_OK, EXIT_FAILED, EXIT_PARTIAL, EXIT_REFUSED = 0, 1, 4, 5


def _ms(value: str | None, option: str) -> int | None:
    if not value:
        return None
    from auditpipe.api.timeparse import TimeParseError, parse_time

    try:
        return int(parse_time(value).timestamp() * 1000)
    except TimeParseError as exc:
        raise ConfigError(f"{option}: {exc}") from None


def selector_from_args(args: argparse.Namespace) -> Selector:
    kinds: tuple[Kind, ...] = ("user", "tenant", "request_id", "event_id")
    chosen: list[tuple[Kind, Any]] = [
        (kind, getattr(args, kind)) for kind in kinds if getattr(args, kind) is not None
    ]
    if args.metadata:
        chosen.append(("metadata", args.metadata))
    if len(chosen) != 1:
        raise ConfigError(
            "erase needs exactly one subject: --user ID, --tenant ID, --request-id ID, "
            "--event-id ID or --metadata K=V (repeatable)"
        )
    kind, value = chosen[0]
    since, until = _ms(args.since, "--since"), _ms(args.until, "--until")
    if since is not None and until is not None and since >= until:
        raise ConfigError("--since must be before --until")
    if kind == "metadata":
        pairs = []
        for raw in value:
            key, sep, val = raw.partition("=")
            if not sep or not key:
                raise ConfigError(f"--metadata {raw!r}: expected KEY=VALUE")
            pairs.append((key, val))
        return Selector("metadata", pairs=tuple(pairs), since_ms=since, until_ms=until)
    return Selector(kind, value, since_ms=since, until_ms=until)


async def _close(stores: Mapping[str, Any]) -> None:
    for store in stores.values():
        try:
            await store.stop()
        except Exception as exc:  # closing must not hide the receipt
            print(f"auditpipe: closing {type(store).__name__}: {exc}", file=sys.stderr)


async def _run(stores: Mapping[str, Any], selector: Selector, **kwargs: Any) -> list[Receipt]:
    try:
        return await erase_everywhere(stores, selector, **kwargs)
    finally:
        await _close(stores)


def _confirm(selector: Selector, receipts: list[Receipt]) -> bool:
    total = sum(r.matched - sum(r.skipped.values()) for r in receipts)
    print(f"About to erase {total} record(s) matching {selector.describe()}:", file=sys.stderr)
    for r in receipts:
        print(f"  {r.line()}", file=sys.stderr)
    try:
        answer = input("Type 'erase' to proceed: ")
    except EOFError:
        return False
    return answer.strip() == "erase"


async def send_event(settings: Settings, event: dict[str, Any]) -> None:
    """Write the erasure event to ``kafka.events_topic`` (past the processors: sampling must
    not drop it, and it holds nothing to redact), acks=all."""
    from aiokafka import AIOKafkaProducer

    from auditpipe.kafka import producer_kwargs
    from auditpipe.schemas import encode

    producer = AIOKafkaProducer(**producer_kwargs(settings.kafka, settings.producer))
    await producer.start()
    try:
        await producer.send_and_wait(
            settings.kafka.events_topic, encode(event), key=event["event_id"].encode()
        )
    finally:
        await producer.stop()


def cmd_erase(args: argparse.Namespace, settings: Settings, origin: str) -> int:
    selector = selector_from_args(args)
    if args.override_retention and not args.reason:
        raise ConfigError("--override-retention needs --reason TEXT (it goes on the receipt)")
    stores = erasable_stores(settings.sinks, origin, args.sink or ())
    if not stores:
        raise ConfigError(f"{origin}: no configured sink holds records ([sinks.NAME] tables)")
    key = None if args.dry_run else hash_key()  # fail before erasing, not after
    # the subject's data keys (crypto-shredding); a bad key store fails here, before erasing
    shred = shredding.plan(settings, selector, restricted=bool(args.sink), dry_run=args.dry_run)
    try:
        return _erase(args, settings, origin, selector, stores, key, shred)
    finally:
        if shred is not None:
            shred.close()


def _erase(
    args: argparse.Namespace,
    settings: Settings,
    origin: str,
    selector: Selector,
    stores: dict[str, Any],
    key: bytes | None,
    shred: shredding.KeyShredding | None,
) -> int:
    min_days = settings.privacy.min_retention_days
    common: dict[str, Any] = {
        "min_retention_days": min_days, "override_retention": args.override_retention,
        "shredded_key": shred.shredded_key if shred else None,
    }  # fmt: skip
    if not args.dry_run and not args.yes:
        if not sys.stdin.isatty():
            print(
                "auditpipe erase: refused: not confirmed (pass --yes, or run it on a terminal "
                "to be asked; --dry-run shows the counts)",
                file=sys.stderr,
            )
            return EXIT_REFUSED
        preview = asyncio.run(_run(stores, selector, dry_run=True, **common))
        if not _confirm(selector, preview):
            print("auditpipe erase: refused: not confirmed", file=sys.stderr)
            return EXIT_REFUSED
        stores = erasable_stores(settings.sinks, origin, args.sink or ())
    receipts = asyncio.run(_run(stores, selector, dry_run=args.dry_run, **common))
    if shred is not None:
        shred.finish(
            receipts,
            protect=min_days > 0 and not args.override_retention,
            retention_reason=retention_reason(min_days),
        )
    out: dict[str, Any] = {
        "dry_run": args.dry_run,
        "selector": selector.kind,
        "min_retention_days": min_days,
        "override_retention": args.override_retention,
        "receipts": [r.as_dict() for r in receipts],
    }
    if shred is not None:
        out["keys"] = shred.as_dict()
    code = EXIT_OK
    if any(r.error for r in receipts):
        code = EXIT_FAILED
    elif any(r.skipped for r in receipts):
        code = EXIT_PARTIAL
    if not args.dry_run:
        assert key is not None
        event = erasure_event(
            selector, receipts, key=key, operator=operator_name(args.operator),
            reason=args.reason, override_retention=args.override_retention,
            keys_deleted=shred.deleted if shred is not None else None,
        )  # fmt: skip
        out["event_id"] = event["event_id"]
        try:
            if not settings.kafka.bootstrap:
                raise AuditpipeError("kafka.bootstrap is not set")
            asyncio.run(send_event(settings, event))
            out["event_sent"] = settings.kafka.events_topic
        except Exception as exc:
            out["event_sent"] = None
            out["event_error"] = str(exc)
            out["event"] = event
            code = EXIT_FAILED
    if args.json:
        print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
    else:
        head = "dry run (nothing changed)" if args.dry_run else "erasure receipt"
        print(f"auditpipe erase: {head}: {selector.kind}")
        for r in receipts:
            print(f"  {r.line()}")
        if shred is not None:
            print(f"  {shred.line()}")
        if args.override_retention:
            print(f"  min_retention_days ({min_days:g}) overridden: {args.reason}")
        if "event_sent" in out:
            if out["event_sent"]:
                print(f"  erasure event {out['event_id']} written to {out['event_sent']}")
            else:
                print(
                    f"  erasure event NOT sent ({out['event_error']}); record it yourself:\n"
                    f"  {orjson.dumps(out['event']).decode()}"
                )
    return code


def cmd_retention(args: argparse.Namespace, settings: Settings, origin: str) -> int:
    min_days = settings.privacy.min_retention_days
    stores = erasable_stores(settings.sinks, origin, args.sink or ())
    now_ms = time.time_ns() // 1_000_000
    rows: list[dict[str, Any]] = []
    selected: dict[str, Any] = {}
    for name, store in stores.items():
        days = getattr(store.config, "retention_days", None)
        if days is not None and days < min_days:
            raise ConfigError(
                f"{origin}: sinks.{name}.retention_days = {days:g} is shorter than [privacy] "
                f"min_retention_days = {min_days:g}: raise it (records must be kept that long)"
            )
        rows.append({"sink": name, "retention_days": days})
        if days is not None:
            selected[name] = store

    async def run() -> dict[str, Receipt]:
        out: dict[str, Receipt] = {}
        try:
            for name, store in selected.items():
                days = store.config.retention_days
                cutoff = Selector.everything(until_ms=now_ms - int(days * DAY_MS))
                (receipt,) = await erase_everywhere(
                    {name: store}, cutoff, dry_run=not args.apply, now_ms=now_ms
                )
                out[name] = receipt
        finally:
            await _close(stores)
        return out

    receipts = asyncio.run(run())
    code = EXIT_OK
    for row in rows:
        r = receipts.get(row["sink"])
        if r is not None:
            row.update(aged_out=r.matched, erased=r.erased, skipped=r.skipped, error=r.error)
            if r.error:
                code = EXIT_FAILED
            elif r.skipped:
                code = max(code, EXIT_PARTIAL)
    if args.json:
        print(orjson.dumps({"apply": args.apply, "sinks": rows}, option=orjson.OPT_INDENT_2)
              .decode())  # fmt: skip
        return code
    print(f"auditpipe retention: {'applied' if args.apply else 'report (nothing changed)'}")
    for row in rows:
        if row["retention_days"] is None:
            print(f"  {row['sink']}: no retention_days: keeps every record")
        elif row.get("error"):
            print(f"  {row['sink']}: FAILED: {row['error']}")
        else:
            verb = "erased" if args.apply else "would be erased"
            done = row["erased"] if args.apply else row["aged_out"]
            kept = "".join(f"; {n} kept: {why}" for why, n in row["skipped"].items())
            print(
                f"  {row['sink']}: retention_days {row['retention_days']:g}: "
                f"{row['aged_out']} older, {done} {verb}{kept}"
            )
    return code


def cmd_decrypt(args: argparse.Namespace, settings: Settings) -> int:
    """JSON lines (files, .gz included, or stdin) out with sealed input/output restored, or
    "[erased]" where the subject's key is gone. Lines that are not JSON objects pass as they
    are."""
    import gzip

    from .envelope import decrypt_event
    from .keys import open_key_store

    store = open_key_store(settings)
    cache: dict[str, bytes | None] = {}

    def lookup(key_id: str) -> bytes | None:
        if key_id not in cache:
            cache[key_id] = store.get(key_id)
        return cache[key_id]

    out = sys.stdout.buffer
    try:
        for path in args.paths or ["-"]:
            if path == "-":
                data = sys.stdin.buffer.read()
            else:
                with open(path, "rb") as fh:
                    data = fh.read()
                if path.endswith(".gz"):
                    data = gzip.decompress(data)
            for line in data.splitlines():
                try:
                    event = orjson.loads(line)
                except orjson.JSONDecodeError:
                    event = None
                if isinstance(event, dict) and "event_id" in event:
                    line = orjson.dumps(decrypt_event(event, lookup))
                out.write(line + b"\n")
    finally:
        store.close()
    out.flush()
    return EXIT_OK


def add_commands(sub: Any, settings_of: Any, origin_of: Any) -> None:
    """Add ``erase``, ``retention`` and ``decrypt`` to the ``auditpipe`` parser's subcommands."""
    erase = sub.add_parser(
        "erase",
        help="erase one subject's records from every configured store, with a receipt",
        description="Finds the records of one subject in every configured sink that holds "
        "records (postgres, mongodb, s3, file) and removes them; prints a receipt per sink and "
        "writes an erasure event (the selector as an HMAC keyed by AUDITPIPE_ERASURE_HASH_KEY) "
        "to kafka.events_topic. Exit: 0 done, 1 a store failed, 2 usage, 4 partial (records "
        "kept: the receipt says why), 5 refused. See docs/privacy.md.",
    )
    erase.add_argument("--config", help="settings file (TOML): [sinks.*], [privacy], [kafka]")
    who = erase.add_argument_group("subject (exactly one)")
    who.add_argument("--user", help="records of this user (event user, or metadata user)")
    who.add_argument("--tenant", help="records of this tenant (event tenant, or metadata)")
    who.add_argument("--request-id", dest="request_id", help="records of this request id")
    who.add_argument("--event-id", dest="event_id", help="the record with this event id")
    who.add_argument(
        "--metadata",
        action="append",
        metavar="KEY=VALUE",
        help="records with this caller metadata pair (repeatable; all must match)",
    )
    erase.add_argument("--since", help="only records captured at or after this time")
    erase.add_argument("--until", help="only records captured before this time")
    erase.add_argument("--sink", action="append", metavar="NAME",
                       help="only this configured sink (repeatable; default: all)")  # fmt: skip
    erase.add_argument("--dry-run", action="store_true", help="count per sink, change nothing")
    erase.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    erase.add_argument("--reason", help="why (recorded on the erasure event)")
    erase.add_argument("--operator", help="who (default: AUDITPIPE_OPERATOR, else the login)")
    erase.add_argument(
        "--override-retention",
        action="store_true",
        help="also erase records younger than [privacy] min_retention_days (needs --reason)",
    )
    erase.add_argument("--json", action="store_true", help="print the receipt as JSON")
    erase.set_defaults(func=lambda a: cmd_erase(a, settings_of(a), origin_of(a)))

    retention = sub.add_parser(
        "retention",
        help="report (or --apply) what ages out of each sink per its retention_days",
        description="For every configured sink with retention_days: how many records are "
        "older; --apply erases them (mongodb's TTL index and postgres' retention loop do it "
        "on their own too). See docs/privacy.md.",
    )
    retention.add_argument("--config", help="settings file (TOML): [sinks.*], [privacy]")
    retention.add_argument("--sink", action="append", metavar="NAME",
                           help="only this configured sink (repeatable)")  # fmt: skip
    retention.add_argument("--apply", action="store_true", help="erase what aged out")
    retention.add_argument("--json", action="store_true", help="print the report as JSON")
    retention.set_defaults(func=lambda a: cmd_retention(a, settings_of(a), origin_of(a)))

    decrypt = sub.add_parser(
        "decrypt",
        help="print records of the file or s3 sink (JSONL, .gz too) with sealed content decrypted",
        description="Reads JSON lines written by a sink with encrypt_content (file segments, "
        "gunzipped S3 objects, or stdin) and prints them with input/output decrypted from the "
        '[privacy] key store, or "[erased]" where the subject\'s key was deleted. See '
        "docs/privacy.md.",
    )
    decrypt.add_argument("--config", help="settings file (TOML): [privacy] key store")
    decrypt.add_argument("paths", nargs="*", metavar="PATH", help="JSONL or .jsonl.gz (- stdin)")
    decrypt.set_defaults(func=lambda a: cmd_decrypt(a, settings_of(a)))
