"""PII and secret detectors of the redact step.

Each detector is a regular expression that proposes candidates plus, where a format has one, a
validator that confirms them (Luhn for cards, mod-97 for IBAN, ``ipaddress`` for IPv6...). That
keeps look-alikes (order numbers, UUIDs, git hashes, versions, dates, prices, ticket ids) out.

Boundaries. A value is found wherever people and programs write it, so the edges of every
pattern are explicit ASCII classes, never ``\\w``/``\\b`` (which are Unicode-aware in Python: a
value right after a CJK character would otherwise be missed):

- a value starts after anything but the characters it is made of (letters and digits for
  tokens; also ``.`` before an IPv4 address, so ``v1.2.3.4`` and OIDs stay out), and also right
  after a JSON escape written out in text (``\\n``, ``\\r``, ``\\t``: a JSON document pasted
  into a message keeps them as two characters);
- a value ends before anything but its own characters; a full stop ends it unless a digit
  follows (``10.0.0.1.`` at the end of a sentence is an address; ``1.2.3.4.5`` is not);
- underscores, quotes, brackets, markdown, ``[REDACTED:X]`` markers and other secrets are
  boundaries like any punctuation.

Values next to values. Overlaps are resolved by priority (secrets first), and each priority
level runs on the text with the values already chosen blanked out, so a phone number is still
found when a card number follows it directly. Card numbers are found in digit runs by
trying every card-shaped window (``4-4-4-4``, ``4-6-5``, one group of 13-19 digits...), so a
card directly after an SSN, a phone number or another card is not swallowed by them.

Time is bounded on hostile input: every quantifier has an upper bound, and every pattern starts
with a look-behind that only lets a match begin at a token boundary, so a long run of
candidate-like characters is scanned from one start, not from each of its positions.
"""

from __future__ import annotations

import bisect
import ipaddress
import itertools
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from .headers import CREDENTIAL_HEADERS

Validator = Callable[[str], bool]
Match = tuple[int, int, str, "Detector"]

#: JSON escapes written out in text (a JSON document pasted into a message keeps ``\n`` as two
#: characters). Detectors run on a copy where they are blanked (two spaces: offsets hold), so
#: they are boundaries like the whitespace they stand for.
_ESCAPES = re.compile(r"\\[nrt]")


def blank_escapes(text: str) -> str:
    return _ESCAPES.sub("  ", text) if "\\" in text else text


def _lb(chars: str, width: int) -> str:
    """Placed after the first ``width`` characters of a match: the character before the match
    is not one of ``chars`` (a regex class body). Patterns start with what they consume, not
    with a look-behind, so the regex engine can skip ahead to their first character."""
    return rf"(?<![{chars}].{{{width}}})"


_E = r"(?![A-Za-z0-9])"  # a token ends here


@dataclass(frozen=True, eq=False)
class Detector:
    """``name`` labels replacements (``[REDACTED:NAME]``); ``group`` selects the secret part
    (a group name or number, or several group names of which the first that matched counts).

    ``validator`` confirms a candidate; ``context(text, start, end)`` may reject one by what
    surrounds it; ``shrink``: when the validator rejects a candidate, shorter ones from the same
    start that end before a space are tried (a phone number followed by a year).

    ``anchors``: lower-case words every match contains (case-insensitive patterns): the text
    is searched for them with ``str.find`` and the pattern is only tried where one occurs,
    from the starts ``anchor_starts(text, position)`` gives (default: the anchor itself).
    """

    name: str
    pattern: re.Pattern[str]
    validator: Validator | None = None
    group: int | str | tuple[str, ...] = 0
    priority: int = 50  # lower wins when two matches overlap
    # Cheap necessary conditions, checked before the full pattern (most text fails them at C
    # speed): one of ``literals`` occurs in the text, or one of ``literals_lower`` in the
    # lower-cased text, or (``digits``) the text has a digit and matches ``hint``. A detector
    # with none of them always runs its full pattern.
    literals: tuple[str, ...] = ()
    literals_lower: tuple[str, ...] = ()
    digits: bool = False
    hint: str = ""
    context: Callable[[str, int, int], bool] | None = None
    shrink: bool = False
    anchors: tuple[str, ...] = ()
    anchor_starts: Callable[[str, int], Iterable[int]] | None = None

    @cached_property
    def hint_re(self) -> re.Pattern[str] | None:
        return re.compile(self.hint) if self.hint else None

    def signature(self) -> list[Any]:
        """What defines this detector's behaviour (for the redaction policy version)."""
        return [
            type(self).__name__, self.name, self.pattern.pattern, self.pattern.flags,
            _qualname(self.validator), self.group, self.priority, _qualname(self.context),
            self.shrink, list(self.anchors), _qualname(self.anchor_starts),
        ]  # fmt: skip

    def matches(self, text: str, low: str | None = None) -> Iterator[re.Match[str]]:
        """The pattern's matches in ``text`` (``low``: ``text.lower()`` when it has the same
        length, for anchored detectors)."""
        if not self.anchors:
            yield from self.pattern.finditer(text)
            return
        if low is None:
            low = text.lower()
            if len(low) != len(text):  # a character whose lower case is longer: no anchors
                yield from self.pattern.finditer(text)
                return
        starts: set[int] = set()
        for anchor in self.anchors:
            pos = low.find(anchor)
            while pos >= 0:
                if self.anchor_starts is None:
                    starts.add(pos)
                else:
                    starts.update(self.anchor_starts(text, pos))
                pos = low.find(anchor, pos + 1)
        done = 0
        for start in sorted(starts):
            if start < done:
                continue
            m = self.pattern.match(text, start)
            if m is not None and m.end() > m.start():
                done = m.end()
                yield m

    def find(self, text: str, low: str | None = None) -> Iterator[tuple[int, int, str]]:
        for m in self.matches(text, low):
            group = self.group
            if isinstance(group, tuple):
                group = next((g for g in group if m.group(g) is not None), group[0])
            value = m.group(group)
            if not value:
                continue
            start, end = m.start(group), m.end(group)
            if self.context is not None and not self.context(text, start, end):
                continue
            if self.validator is None or self.validator(value):
                yield start, end, value
            elif self.shrink:
                shorter = self._shrunk(text, start, end)
                if shorter is not None:
                    yield shorter

    def _shrunk(self, text: str, start: int, end: int) -> tuple[int, int, str] | None:
        assert self.validator is not None
        for cut in range(end - 1, start, -1):
            if not text[cut].isspace() or text[cut - 1].isspace():
                continue
            m = self.pattern.fullmatch(text, start, cut)
            if m is not None and self.validator(m.group()):
                return start, cut, m.group()
        return None


def _qualname(fn: Callable[..., Any] | None) -> str | None:
    return None if fn is None else getattr(fn, "__qualname__", repr(fn))


def _run_start(chars: re.Pattern[str], limit: int) -> Callable[[str, int], list[int]]:
    """Anchor starts: where the run of ``chars`` (one character each) that ends at the anchor
    begins (at most ``limit`` back), and each point inside it after a ``_ . -`` separator."""

    def starts(text: str, pos: int) -> list[int]:
        out = [pos]
        i = pos
        while i > 0 and pos - i < limit and chars.match(text, i - 1):
            i -= 1
            if text[i - 1 : i] in ("_", ".", "-") or i == 0:
                out.append(i)
        out.append(i)
        return out

    return starts


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


def bearer_ok(candidate: str) -> bool:
    """A token, not a word: long, or letters and digits mixed ("Bearer authentication" is prose)."""
    return len(candidate) >= 16 or (
        any(c.isdigit() for c in candidate) and any(c.isalpha() for c in candidate)
    )


_VERSION_BEFORE = re.compile(
    r"(?i)(?<![A-Za-z0-9])(?:version|ver|release|build|firmware|revision|rev|oid|v)"
    r"\.?\s{0,3}[:=#]?\s{0,3}$"
)


def not_a_version(text: str, start: int, end: int) -> bool:
    """An IPv4-shaped number right after "version", "release", "build", "firmware", "OID"... is
    a version or an object identifier, not an address."""
    return _VERSION_BEFORE.search(text, max(0, start - 16), start) is None


def ssn_ok(candidate: str) -> bool:
    """Area 001-665 or 667-899, group 01-99, serial 0001-9999 (what the SSA issues)."""
    area, group, serial = candidate[:3], candidate[4:6], candidate[7:]
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


# -- card numbers -----------------------------------------------------------------------------

# a run starts at a digit that does not continue a number ("12", "1.2", "1-2")
_DIGIT_RUN = re.compile(r"\d(?<!\d\d)(?<!\d[.-]\d)\d*(?:[ -]\d+){0,200}")
_DIGITS = re.compile(r"\d+")
_DECIMAL_AFTER = re.compile(r"\.\d")
# A value a card number may directly follow: a phone number, an SSN (and, handled in the loop,
# another card). Matched at the end of the text before the card.
_VALUE = (
    r"(?:\+\d{1,3}(?:[ .-]?(?:\(\d{1,4}\)|\d{1,4})){2,5}|\(?\d{3}\)?[ .-]?\d{3}[ .-]\d{4}"
    r"|\d{3}-\d{2}-\d{4})"
)
_VALUE_BEFORE = re.compile(_VALUE + r"[ -]$")
_VALUE_END = re.compile(r"(?<![\d+])" + _VALUE + r"$")


def _card_shape(lengths: tuple[int, ...]) -> bool:
    """How card numbers are written: one group of 13-19 digits, groups of four with a shorter
    last one (4-4-4-4, 4-4-4-4-3, 4-4-4-1), or American Express / Diners (4-6-5, 4-6-4)."""
    if len(lengths) == 1:
        return 13 <= lengths[0] <= 19
    if lengths in ((4, 6, 5), (4, 6, 4)):
        return True
    total = sum(lengths)
    return 13 <= total <= 19 and all(n == 4 for n in lengths[:-1]) and 1 <= lengths[-1] <= 4


@dataclass(frozen=True, eq=False)
class CardDetector(Detector):
    """Card numbers in digit runs (digits with single spaces or dashes between groups): every
    card-shaped window of a run is tried, left to right, so a card right after a phone number,
    an SSN or another card is found; a window inside a longer grouped number is not taken."""

    def find(self, text: str, low: str | None = None) -> Iterator[tuple[int, int, str]]:
        for m in self.pattern.finditer(text):
            yield from self._in_run(text, m.start(), m.end())

    def _in_run(self, text: str, run_start: int, run_end: int) -> Iterator[tuple[int, int, str]]:
        groups = [(p.start(), p.end()) for p in _DIGITS.finditer(text, run_start, run_end)]
        usable = len(groups)
        if _DECIMAL_AFTER.match(text, run_end):  # "...1234.56": the last group is an amount
            usable -= 1
        i = 0
        fresh = True  # group i starts the run or follows a card found
        while i < usable:
            found = None
            for k in (5, 4, 3, 1):
                if i + k > usable:
                    continue
                window = groups[i : i + k]
                lengths = tuple(e - s for s, e in window)
                if not _card_shape(lengths):
                    continue
                seps = {text[window[j][1]] for j in range(k - 1)}
                if len(seps) > 1:
                    continue
                if k > 1 and not fresh and self._inside_grouping(text, groups, i, seps):
                    continue
                if (
                    i > 0
                    and self._ends_a_value(text, groups[i][1])
                    and not self._ends_a_value(text, groups[i - 1][1])
                ):
                    continue
                start, end = window[0][0], window[-1][1]
                value = text[start:end]
                if luhn_ok(value):
                    found = (start, end, value, k)
                    break
            if found is None:
                i += 1
                fresh = False
                continue
            yield found[0], found[1], found[2]
            i += found[3]
            fresh = True

    @staticmethod
    def _ends_a_value(text: str, end: int) -> bool:
        """A phone number or an SSN ends at ``end``. A card window does not start with the
        last group of one (it starts after it), unless one also ends before that group."""
        m = _VALUE_END.search(text, max(0, end - 24), end)
        return m is not None and (m.group()[0] != "+" or phone_ok(m.group()))

    @staticmethod
    def _inside_grouping(text: str, groups: list[tuple[int, int]], i: int, seps: set[str]) -> bool:
        """A grouped window whose previous group is four digits joined the same way continues
        a longer grouped number (a serial, a tracking number), unless what precedes it is a
        value of its own (a phone number or an SSN right before the card)."""
        prev_start, prev_end = groups[i - 1]
        if prev_end - prev_start != 4 or text[prev_end] not in seps:
            return False
        before = text[max(0, prev_end - 40) : groups[i][0]]
        return _VALUE_BEFORE.search(before) is None


# -- passwords and credential headers ---------------------------------------------------------

_PASSWORD_WORDS = (
    r"password|passwd|passphrase|passcode|pwd|pass|secret|client[_-]?secret"
    r"|secret[_-]?access[_-]?key|api[_-]?key|apikey|access[_-]?token|auth[_-]?token"
    r"|refresh[_-]?token|id[_-]?token|session[_-]?token|secret[_-]?key|private[_-]?key"
)
#: A key that names a password or secret: DB_PASSWORD, client_secret, x-api-key, secretKey...
PASSWORD_KEY = (
    rf"(?:[A-Za-z0-9]{{1,20}}[_.-]){{0,3}}(?:{_PASSWORD_WORDS})(?:[_-]?(?:key|token|value|hash))?"
)
_PASSWORD_ANCHORS = ("pass", "pwd", "secret", "key", "token", "pin")
#: What a redaction put in place of a value (mask, hash or truncate): never a secret itself.
MARKER = re.compile(r"\[(?:REDACTED|TRUNCATED|[A-Z][A-Z0-9_]{0,40}):[^\]]{0,64}\]")
_NOT_SECRETS = frozenset(
    {"null", "none", "true", "false", "undefined", "required", "optional", "string", "***",
     "****", "*****", "********", "xxx", "xxxx", "<redacted>", "redacted", "hidden", "secret",
     "password", "changeme"}
)  # fmt: skip


def _secret_value(value: str) -> bool:
    # a value that starts with a marker was redacted before (by the producer, say)
    return value.lower() not in _NOT_SECRETS and MARKER.match(value) is None


def _prose_password_ok(value: str) -> bool:
    """'my password is X': X is a password when it does not read like a word."""
    if not _secret_value(value) or len(value) < 4:
        return False
    return (
        any(c.isdigit() for c in value)
        or any(not c.isalnum() for c in value)
        or (any(c.isupper() for c in value[1:]) and any(c.islower() for c in value))
    )


_QUOTED = {'"': re.compile(r'((?:[^"\\\r\n]|\\(?!"))+)(?:\\?")'),
           "'": re.compile(r"([^'\r\n]+)'")}  # fmt: skip
_BARE_VALUE = re.compile(r"(?:[^\s\"',;&\\<>]|\\(?![nrt\"\\/]))+")
_KEY_CHAR = re.compile(r"[A-Za-z0-9_.<-]")


@dataclass(frozen=True, eq=False)
class AssignmentDetector(Detector):
    """``KEY = value`` / ``KEY: "value"`` / ``<KEY>value</KEY>`` / ``KEY is value``: the pattern
    finds the key and what joins it to the value (named groups ``q``: an opening quote,
    ``xml``: an XML tag, ``prose``: "is"); the value is read from there, to its closing quote
    when it has one. ``validator`` applies to values written in prose."""

    def find(self, text: str, low: str | None = None) -> Iterator[tuple[int, int, str]]:
        for m in self.matches(text, low):
            pos = m.end()
            if m.group("xml"):
                close = text.find("</", pos, pos + 513)
                if close > pos:
                    value = text[pos:close].strip()
                    start = text.index(value, pos) if value else pos
                    if value and _secret_value(value):
                        yield start, start + len(value), value
                continue
            quote = m.group("q")
            if quote:
                q = _QUOTED[quote[-1]].match(text, pos)
                if q is not None and q.end(1) - pos <= 512 and _secret_value(q.group(1)):
                    yield q.start(1), q.end(1), q.group(1)
                continue
            v = _BARE_VALUE.match(text, pos)
            if v is None:
                continue
            value = v.group()[:512]
            if m.group("prose"):
                value = value.rstrip(".!?:)")
                if self.validator is not None and not self.validator(value):
                    continue
            elif len(value) < 3 or not _secret_value(value):
                continue
            yield pos, pos + len(value), value


_COOKIE_ATTRIBUTES = frozenset(
    {"expires", "max-age", "domain", "path", "secure", "httponly", "samesite", "priority",
     "partitioned"}
)  # fmt: skip
_COOKIE_PAIR = re.compile(
    r"\s{0,3}([!#$%&'*+.^_`|~0-9A-Za-z-]{1,128})=(\"?)([^;\s\"\\,]{1,4096})\2"
)
_COOKIE_NEXT = re.compile(r"\s{0,3};")
_COOKIE_BARE = re.compile(r"\s{0,3}([^;\s\"\\,=]{6,4096})(?![^;\s\"\\,])")
_AUTH_VALUE = re.compile(
    r"(?:(?:basic|bearer|digest|token|apikey|api-key|negotiate|ntlm|hmac|aws4-hmac-sha256)"
    r"\s{1,3})?([^\s\"'\\,;]{4,4096})",
    re.IGNORECASE,
)
_HEADER_NAME_CHAR = re.compile(r"[A-Za-z0-9_-]")


def credential_value_ok(value: str) -> bool:
    """A header value that looks like a credential, not a word ("Authorization: required")."""
    return _secret_value(value) and (
        len(value) >= 16 or (any(c.isdigit() for c in value) and len(value) >= 6)
    )


@dataclass(frozen=True, eq=False)
class HeaderDetector(Detector):
    """``Name: value`` of a credential header written in text (raw HTTP, curl commands, JSON
    with headers): cookie values one by one (their names and Set-Cookie attributes stay), the
    credentials of the others."""

    def find(self, text: str, low: str | None = None) -> Iterator[tuple[int, int, str]]:
        for m in self.matches(text, low):
            name = m.group("name").lower().replace("_", "-")
            pos = m.end()
            if name in ("cookie", "set-cookie"):
                if _COOKIE_PAIR.match(text, pos) is None:  # a bare value, no name=
                    bare = _COOKIE_BARE.match(text, pos)
                    if bare is not None and credential_value_ok(bare.group(1)):
                        yield bare.start(1), bare.end(1), bare.group(1)
                    continue
                while True:
                    pair = _COOKIE_PAIR.match(text, pos)
                    if pair is None:
                        break
                    value = pair.group(3)
                    if pair.group(1).lower() not in _COOKIE_ATTRIBUTES and _secret_value(value):
                        yield pair.start(3), pair.end(3), value
                    nxt = _COOKIE_NEXT.match(text, pair.end())
                    if nxt is None:
                        break
                    pos = nxt.end()
                continue
            v = _AUTH_VALUE.match(text, pos)
            if v is not None and credential_value_ok(v.group(1)):
                yield v.start(1), v.end(1), v.group(1)


def header_detector(names: Iterable[str] = CREDENTIAL_HEADERS, priority: int = 9) -> Detector:
    """The CREDENTIAL_HEADER detector for ``names`` (dashes and underscores alike)."""
    lowered = {n.lower() for n in names}
    # longest first, then by name: the same pattern in every process (the policy version)
    alternatives = sorted({re.escape(n).replace(r"\-", "[_-]") for n in lowered},
                          key=lambda a: (-len(a), a))  # fmt: skip
    pattern = re.compile(
        r"(?i)(?<![A-Za-z0-9-])(?:http[_-])?(?P<name>" + "|".join(alternatives) + r")"
        r"(?:\\?[\"'])?\s{0,3}[:=]\s{0,3}(?:\\?[\"'])?"
    )
    # the text is searched for the longest word of each name; the name may start up to 25
    # characters before it ("proxy-authorization", an "HTTP_" prefix)
    anchors = tuple(sorted({max(re.split(r"[-_]", n), key=len) for n in lowered}))
    return HeaderDetector(
        "CREDENTIAL_HEADER", pattern, credential_value_ok, priority=priority,
        literals_lower=anchors, anchors=anchors, anchor_starts=_run_start(_HEADER_NAME_CHAR, 25),
    )  # fmt: skip


# -- patterns ---------------------------------------------------------------------------------

_DIGIT = re.compile(r"[0-9]")
_EMAIL_LOCAL_CHAR = re.compile(r"[A-Za-z0-9._%+-]")
_SCHEME_CHAR = re.compile(r"[A-Za-z0-9+.-]")


def _email_starts(text: str, pos: int) -> list[int]:
    """The local part ends at ``pos`` (the "@"): it starts where the run of its characters
    does, at most 64 characters back (an email does not start inside a longer run)."""
    i = pos
    while i > 0 and pos - i <= 64 and _EMAIL_LOCAL_CHAR.match(text, i - 1):
        i -= 1
    return [i] if i < pos and pos - i <= 64 else []


def _scheme_starts(text: str, pos: int) -> list[int]:
    i = pos
    while i > 0 and pos - i <= 21 and _SCHEME_CHAR.match(text, i - 1):
        i -= 1
    return [i]


def _re(pattern: str, flags: int = 0) -> re.Pattern[str]:
    return re.compile(pattern, flags)


_PHONE_END = r"(?![A-Za-z0-9]|-\d)"
_TOKEN_LB = "A-Za-z0-9"

BUILTIN: tuple[Detector, ...] = (
    # secrets first: they win overlaps with the generic PII patterns
    Detector(
        "PRIVATE_KEY",
        _re(
            r"-----BEGIN (?:[A-Z0-9]{1,20} ){0,3}PRIVATE KEY(?: BLOCK)?-----"
            r"(?:[A-Za-z0-9+/=\s]|[A-Za-z-]{1,20}:[^\n\\]{0,100}){0,20000}+"
            r"(?:-----END (?:[A-Z0-9]{1,20} ){0,3}PRIVATE KEY(?: BLOCK)?-----)?"
        ),
        priority=1,
        literals=("PRIVATE KEY",),
    ),
    Detector(
        "JWT",
        _re(
            r"eyJ"
            + _lb(_TOKEN_LB, 3)
            + r"[A-Za-z0-9_-]{4,4096}\.eyJ[A-Za-z0-9_-]{4,8192}\.[A-Za-z0-9_-]{8,4096}"
            + _E
        ),
        priority=5,
        literals=("eyJ",),
    ),
    Detector(
        "ANTHROPIC_KEY",
        _re(r"sk-ant-" + _lb(_TOKEN_LB, 7) + r"[A-Za-z0-9]{2,10}-[A-Za-z0-9_-]{20,200}"),
        priority=5,
        literals=("sk-ant-",),
    ),
    Detector(
        "OPENAI_KEY",
        _re(
            r"sk-"
            + _lb(_TOKEN_LB, 3)
            + r"(?:proj-|svcacct-|admin-|None-)?[A-Za-z0-9_-]{20,200}"
            + _E
        ),
        priority=6,
        literals=("sk-",),
    ),
    Detector(
        "AWS_ACCESS_KEY_ID",
        _re(r"A(?:KIA|SIA|BIA|CCA)" + _lb("A-Z0-9", 4) + r"[A-Z0-9]{16}(?![A-Z0-9])"),
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
        anchors=("aws",),
    ),
    Detector(
        "GITHUB_TOKEN",
        _re(
            r"gh[pousr]_"
            + _lb(_TOKEN_LB, 4)
            + r"[A-Za-z0-9]{36,255}"
            + _E
            + r"|github_pat_"
            + _lb(_TOKEN_LB, 11)
            + r"[A-Za-z0-9_]{22,255}"
            + _E
        ),
        priority=5,
        literals=("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
    ),
    Detector(
        "SLACK_TOKEN",
        _re(r"xox[abposre]-" + _lb(_TOKEN_LB, 5) + r"[A-Za-z0-9-]{10,250}" + _E),
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
        "GOOGLE_API_KEY",
        _re(r"AIza" + _lb(_TOKEN_LB, 4) + r"[0-9A-Za-z_-]{35}" + _E),
        priority=5,
        literals=("AIza",),
    ),
    Detector(
        "STRIPE_KEY",
        _re(
            r"[srp]k_(?:live|test)_"
            + _lb(_TOKEN_LB, 8)
            + r"[A-Za-z0-9]{10,99}"
            + _E
            + r"|whsec_"
            + _lb(_TOKEN_LB, 6)
            + r"[A-Za-z0-9]{20,99}"
            + _E
        ),
        priority=5,
        literals=("_live_", "_test_", "whsec_"),
    ),
    Detector(
        "BEARER_TOKEN",
        _re(
            r"(?i:bearer)"
            + _lb(_TOKEN_LB, 6)
            + r"(?:\s{1,4}|%20|\+)(?P<v>[A-Za-z0-9._~+/=-]{8,4096})"
        ),
        bearer_ok,
        group="v",
        priority=7,
        literals_lower=("bearer",),
        anchors=("bearer",),
    ),
    AssignmentDetector(
        "PASSWORD_ASSIGNMENT",
        _re(
            r"(?i)(?<![A-Za-z0-9])(?:"
            # KEY = value, KEY: "value", "KEY": 'value' (quotes may be JSON-escaped)
            r"(?:" + PASSWORD_KEY + r")(?![A-Za-z0-9])(?:\\?[\"'])?\s{0,3}(?::=|=>|[=:])\s{0,3}"
            r"(?P<q>\\?[\"'])?"
            # <password>value</password>
            r"|<(?P<xml>" + PASSWORD_KEY + r")>"
            # my password is value
            r"|(?:password|passphrase|passcode|pin)(?P<prose>\s{1,3}(?:is|was)\s{1,3}:?\s{0,3})"
            r")"
        ),
        _prose_password_ok,
        priority=8,
        literals_lower=_PASSWORD_ANCHORS,
        anchors=_PASSWORD_ANCHORS,
        anchor_starts=_run_start(_KEY_CHAR, 64),
    ),
    Detector(
        "PASSWORD_ASSIGNMENT",  # user:password@ in URLs (postgres://app:pw@db/...)
        _re(
            r"(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]{1,20}://[^\s:/@\"'<>\\]{1,128}:"
            r"(?P<v>[^\s/@\"'<>\\]{1,256})@"
        ),
        _secret_value,
        group="v",
        priority=8,
        literals=("://",),
        anchors=("://",),
        anchor_starts=_scheme_starts,
    ),
    header_detector(),
    # personal data
    Detector(
        "EMAIL",
        _re(
            r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]{1,64}(?:@|%40)"
            r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.){1,8}[A-Za-z]{2,24}(?![A-Za-z0-9-])"
        ),
        priority=10,
        literals=("@", "%40"),
        anchors=("@", "%40"),
        anchor_starts=_email_starts,
    ),
    Detector(
        "IBAN",
        _re(
            r"[A-Z]{2}\d{2}" + _lb("A-Za-z0-9", 4) + r"(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?"
            r"(?![A-Za-z0-9])"
        ),
        iban_ok,
        priority=12,
        digits=True,
        hint=r"[A-Z]{2}\d{2}",
        shrink=True,
    ),
    CardDetector(
        "CREDIT_CARD",
        _DIGIT_RUN,
        luhn_ok,
        priority=12,
        digits=True,
        hint=r"\d(?:[ -]?\d){12}",
    ),
    Detector(
        "US_SSN",
        _re(r"\d" + _lb(r"\d-", 1) + r"\d\d([- ])\d{2}\1\d{4}(?![\d-])"),
        ssn_ok,
        priority=14,
        digits=True,
        hint=r"\d{3}[- ]\d{2}[- ]\d{4}",
    ),
    # phone numbers: international with a leading + (or %2B in a URL); North American with
    # parentheses or separators. Three patterns, each starting with what it consumes first
    # (a "+" is found much faster than any digit).
    Detector(
        "PHONE",
        _re(
            r"(?:\+" + _lb("A-Za-z0-9+", 1) + r"|%2B" + _lb("A-Za-z0-9", 3) + r")"
            r"[1-9]\d{0,2}(?:[ .-]?\(\d{1,4}\))?(?:[ .-]?\d{1,4}){2,5}" + _PHONE_END
        ),
        phone_ok,
        priority=16,
        literals=("+", "%2B"),
        shrink=True,
    ),
    Detector(
        "PHONE",
        _re(r"\(" + _lb("A-Za-z0-9", 1) + r"\d{3}\)\s?\d{3}[.\s-]\d{4}" + _PHONE_END),
        phone_ok,
        priority=16,
        literals=("(",),
    ),
    Detector(
        "PHONE",
        _re(r"\d" + _lb("A-Za-z0-9", 1) + r"\d\d(?:[.-]\d{3}[.-]|\s\d{3}[\s-])\d{4}" + _PHONE_END),
        phone_ok,
        priority=16,
        digits=True,
        hint=r"\d{3}[ .-]\d{3}",
    ),
    Detector(
        "IPV4",
        _re(
            # the first octet is written from its first digit on, so the pattern starts with
            # a digit (fast to search for) and checks what comes before that digit
            r"\d" + _lb("A-Za-z0-9.", 1) + r"(?:(?<=1)\d\d|(?<=2)(?:[0-4]\d|5[0-5])|(?<=[1-9])\d|)"
            r"\.(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){2}"
            r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![A-Za-z0-9]|\.\d|[-+][A-Za-z])"
        ),
        priority=18,
        digits=True,
        hint=r"\d\.\d{1,3}\.\d{1,3}\.\d",
        context=not_a_version,
    ),
    Detector(
        "IPV6",
        _re(
            r"[0-9A-Fa-f:]"
            + _lb("A-Za-z0-9.", 1)
            + r"(?:[0-9A-Fa-f:]{0,37}[0-9A-Fa-f]|[0-9A-Fa-f:]{0,36}::)"
            + r"(?![A-Za-z0-9]|:[0-9A-Fa-f:])"
        ),
        ipv6_ok,
        priority=18,
        literals=("::",),
        digits=True,
        hint=r"[0-9A-Fa-f]:[0-9A-Fa-f]",
    ),
)

BUILTIN_NAMES = tuple(dict.fromkeys(d.name for d in BUILTIN))


class Gate:
    """The detectors' pre-checks, merged: which detectors are worth running on a text.

    ``candidates(text)`` costs a few C-level substring searches; for most strings of a chat
    event (roles, ids, model names, plain prose) it returns nothing and no regex runs at all.
    The candidates come sorted by priority (what :func:`find_all` needs).
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
            found.sort(key=_priority)
        return found


def _priority(d: Detector) -> int:
    return d.priority


def find_all(text: str, detectors: tuple[Detector, ...] | list[Detector]) -> list[Match]:
    """Non-overlapping matches in text order, with their values as in ``text``.

    Detectors run by priority; each priority level sees the text with the matches of the
    levels before it blanked out (so values next to each other are all found), and within a
    level longer matches win. Written-out JSON escapes are blanked first (see
    :func:`blank_escapes`)."""
    if not detectors:
        return []
    scan = blank_escapes(text)
    low: str | None = None
    if any(d.anchors for d in detectors):
        low = scan.lower()
        if len(low) != len(scan):
            low = None
    if len(detectors) == 1:
        det = detectors[0]
        return [(s, e, text[s:e], det) for s, e, _ in det.find(scan, low)]
    if any(a.priority > b.priority for a, b in itertools.pairwise(detectors)):
        detectors = sorted(detectors, key=_priority)
    chosen: list[Match] = []  # sorted by start, never overlapping
    starts: list[int] = []
    masked, masked_low = scan, low
    i, n = 0, len(detectors)
    while i < n:
        level = detectors[i].priority
        j = i
        found: list[Match] = []
        while j < n and detectors[j].priority == level:
            det = detectors[j]
            found.extend((s, e, text[s:e], det) for s, e, _ in det.find(masked, masked_low))
            j += 1
        i = j
        if not found:
            continue
        if len(found) > 1:
            found.sort(key=lambda m: (m[0] - m[1], m[0]))
        added = False
        for m in found:
            k = bisect.bisect_right(starts, m[0])
            if k > 0 and chosen[k - 1][1] > m[0]:  # the interval before overlaps our start
                continue
            if k < len(chosen) and chosen[k][0] < m[1]:  # the interval after starts inside us
                continue
            starts.insert(k, m[0])
            chosen.insert(k, m)
            added = True
        if added and i < n:
            masked = _blank(scan, chosen)
            masked_low = None if low is None else _blank(low, chosen)
    return chosen


def _blank(text: str, chosen: list[Match]) -> str:
    """``text`` with the chosen spans replaced by spaces (same length, so offsets hold)."""
    parts: list[str] = []
    pos = 0
    for start, end, _, _ in chosen:
        parts.append(text[pos:start])
        parts.append(" " * (end - start))
        pos = end
    parts.append(text[pos:])
    return "".join(parts)
