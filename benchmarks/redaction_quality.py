"""Recall and precision of `auditpipe redact` (default settings) on the grown corpus, per kind.

    .venv/bin/python benchmarks/redaction_quality.py [--misses] [--config FILE] [--ref REF]

The corpus is ``tests/redaction_corpus.py``: every kind of secret in every kind of context
(punctuation, quotes, brackets, line ends, JSON-escaped text, URLs, key=value, markdown, CJK
text, next to other secrets and to ``[REDACTED:X]`` markers), whole records with credential
headers in structured places, and look-alikes (versions, order ids, ISBNs, UUIDs, timestamps,
hashes, prices, dates, tickets, MAC addresses, OIDs...) in the same contexts. Records go
through the same code as ``auditpipe redact`` (the configured chain, run offline over JSONL).

Prints one JSON object: overall recall (secrets removed / secrets) and precision (correct
redactions / all redactions; a marker in a look-alike is a false one), both per kind, and
with ``--misses`` what survived or was wrongly changed. ``--ref main`` scores the default
redact step of that git ref instead (loaded as ``redact_bench.py`` does), on the same corpus.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from redact_bench import load_before

from auditpipe.settings import load_settings
from tests.redaction_corpus import redact_like_the_cli, score


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--misses", action="store_true", help="list what leaked or was changed")
    parser.add_argument("--config", help="settings file ([pipeline] as for `auditpipe redact`)")
    parser.add_argument("--ref", help="score the redact step of this git ref instead")
    args = parser.parse_args(argv)
    pipeline = load_settings(args.config).pipeline if args.config else None
    if args.ref:
        step = load_before(args.ref)
        if step is None:
            return 1
        report = score(lambda records: redact_like_the_cli(records, chain=[step]))
    else:
        report = score(lambda records: redact_like_the_cli(records, pipeline))
    result = {"ref": args.ref or "this checkout", **report.as_dict()}
    if args.misses:
        result["misses"] = report.misses()
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
