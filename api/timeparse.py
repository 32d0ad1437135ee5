"""Points in time for ``--since`` / ``--until`` and the viewer's filters.

Accepted forms (always resolved to an aware UTC datetime):

- ISO-8601: ``2026-12-01``, ``2026-12-01T10:30``, ``2026-12-01 10:30:00Z``,
  ``2026-12-01T10:30:00+01:00``; without an offset the time is UTC.
- relative, counted back from now: ``90s``, ``15m``, ``2h``, ``7d``, ``2w``, also spelt out and
  with ``ago`` (``2 hours ago``, ``3 days``).
- ``now``, ``today`` (00:00 UTC), ``yesterday`` (00:00 UTC the day before).
- Unix time in seconds (``1764547200``) or milliseconds (``1764547200000``).
"""

from __future__ import annotations

import datetime as dt
import re

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_RELATIVE = re.compile(
    r"^(\d+(?:\.\d+)?)\s*(s|secs?|seconds?|m|mins?|minutes?|h|hrs?|hours?|d|days?|w|wks?|weeks?)"
    r"(?:\s+ago)?$",
    re.IGNORECASE,
)
FORMS = "ISO-8601 (2026-12-01, 2026-12-01T10:30:00Z), relative (90s, 15m, 2h, 7d, 2w), " \
        "now, today, yesterday, or Unix seconds"  # fmt: skip


class TimeParseError(ValueError):
    """Not a time in any accepted form; the message lists them."""


def parse_time(text: str, now: dt.datetime | None = None) -> dt.datetime:
    value = text.strip()
    now = now or dt.datetime.now(dt.UTC)
    lower = value.lower()
    if lower == "now":
        return now
    if lower in ("today", "yesterday"):
        midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
        return midnight - dt.timedelta(days=1 if lower == "yesterday" else 0)
    match = _RELATIVE.match(lower)
    if match:
        number, unit = float(match.group(1)), match.group(2)[0]
        return now - dt.timedelta(seconds=number * _UNITS[unit])
    if value.isdigit() and len(value) >= 9:
        seconds = int(value) / (1000 if len(value) >= 13 else 1)
        return dt.datetime.fromtimestamp(seconds, dt.UTC)
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise TimeParseError(f"{text!r} is not a time; use {FORMS}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.astimezone(dt.UTC)
