"""PII and secret detectors for the redact step.

Each detector is a regular expression that proposes candidates plus, where a format has one, a
validator that confirms them (Luhn for cards, mod-97 for IBAN, ``ipaddress`` for IPv6...). That
keeps look-alikes (order numbers, UUIDs, git hashes, versions, dates, prices, ticket ids) out.

Time is bounded on hostile input: every quantifier has an upper bound, and every pattern starts
with a look-behind that only lets a match begin at a token boundary, so a long run of
candidate-like characters is scanned from one start, not from each of its positions.
"""

from __future__ import annotations

import bisect
import ipaddress
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property

Validator = Callable[[str], bool]


@dataclass(frozen=True, eq=False)
class Detector:
    """``name`` labels replacements (``[REDACTED:NAME]``); ``group`` selects the secret part."""

    name: str
    pattern: re.Pattern[str]
    validator: Validator | None = None
    group: int | str = 0
    priority: int = 50  # lower wins when two matches overlap
    # Cheap necessary conditions, checked before the full pattern (most text fails them at C
    # speed): one of ``literals`` occurs in the text, or one of ``literals_lower`` in the
    # lower-cased text, or (``digits``) the text has a digit and matches ``hint``. A detector
    # with none of them always runs its full pattern.
    literals: tuple[str, ...] = ()
    literals_lower: tuple[str, ...] = ()
    digits: bool = False
    hint: str = ""

    @cached_property
    def hint_re(self) -> re.Pattern[str] | None:
        return re.compile(self.hint) if self.hint else None

    def find(self, text: str) -> Iterator[tuple[int, int, str]]:
        for m in self.pattern.finditer(text):
            value = m.group(self.group)
            if not value:
                continue
            if self.validator is None or self.validator(value):
                yield m.start(self.group), m.end(self.group), value


# -- validators -------------------------------------------------------------------------------


def luhn_ok(candidate: str) -> bool:
    digits = [int(c) for c in candidate if c.isdigit()]
    if not 13 <= len(digits) <= 19 or len(set(digits)) == 1:
        return False
    seps = {c for c in candidate if not c.isdigit()}
    if len(seps) > 1:  # "4111 1111-1111 1111" mixes separators: not a card as written
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BR": 29, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20,
    "EG": 29, "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18,
    "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IS": 26, "IT": 27, "JO": 30,
    "KW": 30, "KZ": 20, "LB": 28, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MD": 24,
    "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15, "PK": 24, "PL": 28,
    "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24, "SE": 24, "SI": 19, "SK": 24,
    "SM": 27, "TN": 24, "TR": 26, "UA": 29, "VG": 24, "XK": 20,
}  # fmt: skip


def iban_ok(candidate: str) -> bool:
    iban = candidate.replace(" ", "").upper()
    if _IBAN_LENGTHS.get(iban[:2]) != len(iban):
        return False
    rearranged = iban[4:] + iban[:4]
    number = "".join(str(int(c, 36)) for c in rearranged)
    return int(number) % 97 == 1


def ipv6_ok(candidate: str) -> bool:
    if candidate.count(":") < 2 or sum(1 for part in candidate.split(":") if part) < 2:
        return False
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    return True


def phone_ok(candidate: str) -> bool:
    digits = sum(c.isdigit() for c in candidate)
    return 10 <= digits <= 15


def aws_secret_ok(candidate: str) -> bool:
    """40 base64 characters with mixed case and a digit: not a hex git hash."""
    return (
        any(c.isupper() for c in candidate)
        and any(c.islower() for c in candidate)
        and any(c.isdigit() for c in candidate)
    )


# -- patterns ---------------------------------------------------------------------------------

_B = r"(?<![A-Za-z0-9_])"  # a token starts here (left boundary)
_E = r"(?![A-Za-z0-9_])"  # and ends here


_DIGIT = re.compile(r"[0-9]")


def _re(pattern: str, flags: int = 0) -> re.Pattern[str]:
    return re.compile(pattern, flags)


BUILTIN: tuple[Detector, ...] = (
    # secrets first: they win overlaps with the generic PII patterns
    Detector(
        "PRIVATE_KEY",
        _re(
            r"-----BEGIN (?:[A-Z0-9]{1,20} ){0,3}PRIVATE KEY-----"
            r"(?:[A-Za-z0-9+/=\s]|[A-Za-z-]{1,20}:[^\n]{0,100}){0,20000}+"
            r"(?:-----END (?:[A-Z0-9]{1,20} ){0,3}PRIVATE KEY-----)?"
        ),
        priority=1,
        literals=("PRIVATE KEY",),
    ),
    Detector(
        "JWT",
        _re(_B + r"eyJ[A-Za-z0-9_-]{4,4096}\.eyJ[A-Za-z0-9_-]{4,8192}\.[A-Za-z0-9_-]{8,4096}" + _E),
        priority=5,
        literals=("eyJ",),
    ),
    Detector(
        "ANTHROPIC_KEY",
        _re(_B + r"sk-ant-[A-Za-z0-9]{2,10}-[A-Za-z0-9_-]{20,200}"),
        priority=5,
        literals=("sk-ant-",),
    ),
    Detector(
        "OPENAI_KEY",
        _re(_B + r"sk-(?:proj-|svcacct-|admin-|None-)?[A-Za-z0-9_-]{20,200}" + _E),
        priority=6,
        literals=("sk-",),
    ),
    Detector(
        "AWS_ACCESS_KEY_ID",
        _re(r"(?<![A-Z0-9])(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}(?![A-Z0-9])"),
        priority=5,
        literals=("AKIA", "ASIA", "ABIA", "ACCA"),
    ),
    Detector(
        "AWS_SECRET_KEY",
        _re(
            r"(?i:aws.{0,24}?(?:secret|private).{0,24}?)[=:\s\"']{1,4}"
            r"(?P<v>[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+])"
        ),
        aws_secret_ok,
        group="v",
        priority=5,
        literals_lower=("aws",),
    ),
    Detector(
        "GITHUB_TOKEN",
        _re(
            _B
            + r"(?:(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})"
            + _E
        ),
        priority=5,
        literals=("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
    ),
    Detector(
        "SLACK_TOKEN",
        _re(_B + r"xox[abposre]-[A-Za-z0-9-]{10,250}" + _E),
        priority=5,
        literals=("xox",),
    ),
    Detector(
        "SLACK_WEBHOOK",
        _re(
            r"https://hooks\.slack\.com/services/[A-Za-z0-9]{6,20}/[A-Za-z0-9]{6,20}/[A-Za-z0-9]{10,40}"
        ),
        priority=4,
        literals=("hooks.slack.com",),
    ),
    Detector(
        "GOOGLE_API_KEY", _re(_B + r"AIza[0-9A-Za-z_-]{35}" + _E), priority=5, literals=("AIza",)
    ),
    Detector(
        "STRIPE_KEY",
        _re(
            _B
            + r"(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{10,99}"
            + _E
            + r"|"
            + _B
            + r"whsec_[A-Za-z0-9]{20,99}"
            + _E
        ),
        priority=5,
        literals=("_live_", "_test_", "whsec_"),
    ),
    Detector(
        "BEARER_TOKEN",
        _re(r"(?i:\bbearer)\s{1,4}(?P<v>[A-Za-z0-9._~+/=-]{16,4096})"),
        group="v",
        priority=7,
        literals_lower=("bearer",),
    ),
    Detector(
        "PASSWORD_ASSIGNMENT",
        _re(
            r"(?i:\b(?:password|passwd|pwd|secret|api[_-]?key|access[_-]?token|auth[_-]?token|"
            r"client[_-]?secret|private[_-]?key))[\"']?\s{0,3}[=:]\s{0,3}[\"']?"
            r"(?P<v>[^\s\"',;&]{3,512})"
        ),
        group="v",
        priority=8,
        literals_lower=("pass", "pwd", "secret", "key", "token"),
    ),
    # personal data
    Detector(
        "EMAIL",
        _re(
            r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]{1,64}@"
            r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.){1,8}[A-Za-z]{2,24}(?![A-Za-z0-9-])"
        ),
        priority=10,
        literals=("@",),
    ),
    Detector(
        "IBAN",
        _re(
            r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?"
            r"(?![A-Za-z0-9])"
        ),
        iban_ok,
        priority=12,
        digits=True,
        hint=r"[A-Z]{2}\d{2}",
    ),
    Detector(
        "CREDIT_CARD",
        _re(r"(?<![\d.-])\d(?:[ -]?\d){12,18}(?![\d-]|\.\d)"),
        luhn_ok,
        priority=12,
        digits=True,
        hint=r"\d(?:[ -]?\d){12}",
    ),
    Detector(
        "US_SSN",
        _re(r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])"),
        priority=14,
        digits=True,
        hint=r"\d{3}-\d{2}-\d{4}",
    ),
    Detector(
        "PHONE",
        _re(
            # international with a leading +, or North American with separators/parentheses
            r"(?<![\w+])\+[1-9]\d{0,2}(?:[ .-]?\(?\d{1,4}\)?){2,5}(?![\w-])"
            r"|(?<![\w(])(?:\(\d{3}\)\s?|\d{3}[.-])\d{3}[.-]\d{4}(?![\w-])"
            r"|(?<![\w(])(?:\(\d{3}\)\s?|\d{3}\s)\d{3}[\s-]\d{4}(?![\w-])"
        ),
        phone_ok,
        priority=16,
        digits=True,
        hint=r"\+[1-9]|\d{3}[ .)-]{1,2}\d{3}",
    ),
    Detector(
        "IPV4",
        _re(
            r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}"
            r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w.]|\.\d)"
        ),
        priority=18,
        digits=True,
        hint=r"\d\.\d{1,3}\.\d{1,3}\.\d",
    ),
    Detector(
        "IPV6",
        _re(r"(?<![\w:.])[0-9A-Fa-f:]{2,39}(?![\w:])"),
        ipv6_ok,
        priority=18,
        literals=("::",),
        digits=True,
        hint=r"[0-9A-Fa-f]:[0-9A-Fa-f]",
    ),
)

BUILTIN_NAMES = tuple(d.name for d in BUILTIN)


class Gate:
    """The detectors' pre-checks, merged: which detectors are worth running on a text.

    ``candidates(text)`` costs a few C-level substring searches; for most strings of a chat
    event (roles, ids, model names, plain prose) it returns nothing and no regex runs at all.
    """

    def __init__(self, detectors: tuple[Detector, ...] | list[Detector]) -> None:
        self.unconditional = [
            d for d in detectors if not (d.literals or d.literals_lower or d.digits)
        ]
        by_literal: dict[str, list[Detector]] = {}
        by_lower: dict[str, list[Detector]] = {}
        for d in detectors:
            for x in d.literals:
                by_literal.setdefault(x, []).append(d)
            for x in d.literals_lower:
                by_lower.setdefault(x, []).append(d)
        self.by_literal = tuple(by_literal.items())
        self.by_lower = tuple(by_lower.items())
        self.by_digit = tuple((d, d.hint_re) for d in detectors if d.digits)
        self._cache: dict[str, list[Detector]] = {}

    _SHORT = 96  # strings up to this length are memoised: roles, ids, models, header values
    _CACHE_MAX = 8192

    def candidates(self, text: str) -> list[Detector]:
        if len(text) <= self._SHORT:
            cached = self._cache.get(text)
            if cached is None:
                if len(self._cache) >= self._CACHE_MAX:
                    self._cache.clear()
                cached = self._cache[text] = self._candidates(text)
            return cached
        return self._candidates(text)

    def _candidates(self, text: str) -> list[Detector]:
        found = list(self.unconditional)
        for x, dets in self.by_literal:
            if x in text:
                found.extend(dets)
        if self.by_lower:
            low = text.lower()
            for x, dets in self.by_lower:
                if x in low:
                    found.extend(dets)
        if self.by_digit and _DIGIT.search(text) is not None:
            for d, hint in self.by_digit:
                if hint is None or hint.search(text) is not None:
                    found.append(d)
        if len(found) > 1:
            found = list(dict.fromkeys(found))
        return found


def find_all(
    text: str, detectors: tuple[Detector, ...] | list[Detector]
) -> list[tuple[int, int, str, Detector]]:
    """Non-overlapping matches, by priority then length, in text order."""
    found: list[tuple[int, int, str, Detector]] = []
    for det in detectors:
        for start, end, value in det.find(text):
            found.append((start, end, value, det))
    if len(found) <= 1:
        return found
    found.sort(key=lambda m: (m[3].priority, -(m[1] - m[0]), m[0]))
    starts: list[int] = []  # chosen intervals, sorted by start, never overlapping
    chosen: list[tuple[int, int, str, Detector]] = []
    for m in found:
        i = bisect.bisect_right(starts, m[0])
        if i > 0 and chosen[i - 1][1] > m[0]:  # the interval before overlaps our start
            continue
        if i < len(chosen) and chosen[i][0] < m[1]:  # the interval after starts inside us
            continue
        starts.insert(i, m[0])
        chosen.insert(i, m)
    return chosen
