"""redact: remove personal data and secrets from everything people will read.

Scans every string in ``input`` and ``output`` (recursively), ``metadata`` values and
``headers`` values, the caller's ``user`` and ``tenant`` and the ``error`` message with the
detectors (``detectors.py``) plus custom regexes, and applies field rules by JSON path first.
Actions:

- ``mask``: ``[REDACTED:EMAIL]``
- ``hash``: ``[EMAIL:1f0c9a...]``, HMAC-SHA256 with ``hash_key``: a stable pseudonym per value
- ``remove``: the matched text (or field) disappears
- ``truncate``: the first ``truncate_keep_chars`` characters stay, then ``…[TRUNCATED:EMAIL]``

Credentials by name, wherever they are: a value whose key names a credential header
(``authorization``, ``proxy-authorization``, ``cookie``, ``set-cookie``, ``x-api-key``,
``api-key``, ... and ``credential_headers``; any case, ``_`` or ``-``, CGI's ``HTTP_`` prefix)
is replaced whole (label ``CREDENTIAL_HEADER``), in any map of the record (``headers``,
``metadata``, request bodies that carry headers, a response's headers), in lists of
``[name, value]`` pairs and in ``{"name": ..., "value": ...}`` entries (HAR). This happens
even with ``scan_headers``/``scan_metadata`` off. With ``PASSWORD_ASSIGNMENT`` on, a string
under a key that names a password or secret (``password``, ``db_password``, ``client_secret``,
``apiKey``...) is replaced the same way.

Field rules (``[[pipeline.redact.fields]]``): ``path`` like ``input.user``,
``input.messages[*].name`` or ``metadata.*``; ``action`` is ``drop`` (remove the field),
``keep`` (never scanned) or one of the actions above (applied to the whole value).

Policy version: ``policy_version`` is a hash of everything that decides what is redacted and
how (the detectors and their patterns, actions, custom detectors, field rules, credential
names, scan switches, the step version), not of the HMAC key. It is recorded on the step's
``processing`` entry of every event, so an auditor knows which policy produced a record.

It fails closed: any exception propagates, so the event is dead-lettered and never forwarded.
What it did is recorded in ``processing`` as counts per detector, never the values.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections import Counter
from typing import Any, Literal

import orjson
from pydantic import Field, field_validator, model_validator

from auditpipe.errors import ConfigError
from auditpipe.schemas import Event
from auditpipe.settings import StrictModel
from auditpipe.steps import ProcessorStep, record_step

from .detectors import (
    BUILTIN,
    BUILTIN_NAMES,
    CREDENTIAL_HEADERS,
    MARKER,
    PASSWORD_KEY,
    Detector,
    Gate,
    find_all,
    header_detector,
)

Action = Literal["mask", "hash", "remove", "truncate"]
FieldAction = Literal["mask", "hash", "remove", "truncate", "drop", "keep"]

HEADER_LABEL = "CREDENTIAL_HEADER"
PASSWORD_LABEL = "PASSWORD_ASSIGNMENT"


class CustomDetector(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,40}$", description="the label")
    pattern: str = Field(description="a Python regular expression")
    action: Action | None = Field(None, description="default: the step's action")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        return value


class FieldRule(StrictModel):
    path: str = Field(
        pattern=r"^(input|output|metadata|headers)(\.[^.\s]+|\[\*\])*$",
        description="input.user, input.messages[*].name, metadata.*",
    )
    action: FieldAction = Field(description="drop | keep | mask | hash | remove | truncate")


class RedactConfig(StrictModel):
    detectors: list[str] = Field(
        default_factory=lambda: list(BUILTIN_NAMES),
        description="built-in detectors to run (default: all)",
    )
    action: Action = Field("mask", description="what replaces a finding")
    actions: dict[str, Action] = Field(default_factory=dict, description="per-detector action")
    custom: list[CustomDetector] = Field(default_factory=list, description="regex detectors")
    fields: list[FieldRule] = Field(default_factory=list, description="rules by JSON path")
    hash_key: str | None = Field(None, description="HMAC key for action 'hash'")
    hash_key_env: str = Field(
        "AUDITPIPE_REDACT_HASH_KEY", description="environment variable holding the HMAC key"
    )
    truncate_keep_chars: int = Field(4, ge=0, description="characters 'truncate' keeps")
    scan_headers: bool = Field(True, description="scan header values with the detectors")
    scan_metadata: bool = Field(True, description="scan metadata values with the detectors")
    credential_headers: list[str] = Field(
        default_factory=list,
        description="header names removed as credentials, in addition to the built-in ones "
        "(authorization, proxy-authorization, cookie, set-cookie, x-api-key, api-key, "
        "x-auth-token, x-amz-security-token, x-goog-api-key), which always apply",
    )

    @field_validator("detectors")
    @classmethod
    def _known_detectors(cls, value: list[str]) -> list[str]:
        unknown = [d for d in value if d.upper() not in BUILTIN_NAMES]
        if unknown:
            raise ValueError(f"unknown detector(s) {unknown}; allowed: {', '.join(BUILTIN_NAMES)}")
        return [d.upper() for d in value]

    @field_validator("credential_headers")
    @classmethod
    def _header_names(cls, value: list[str]) -> list[str]:
        bad = [n for n in value if not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,128}", n)]
        if bad:
            raise ValueError(f"not HTTP header names: {bad}")
        return [_normalise(n) for n in value]

    @model_validator(mode="after")
    def _actions_known(self) -> RedactConfig:
        names = set(BUILTIN_NAMES) | {c.name.upper() for c in self.custom}
        unknown = [k for k in self.actions if k.upper() not in names]
        if unknown:
            raise ValueError(f"actions: unknown detector(s) {unknown}")
        return self


def _normalise(name: str) -> str:
    """A key as a header name: lower case, ``-`` for ``_``, without CGI's ``http-`` prefix."""
    key = name.strip().lower().replace("_", "-")
    return key[5:] if key.startswith("http-") else key


_PASSWORD_KEY = re.compile(PASSWORD_KEY, re.IGNORECASE)


class RedactStep(ProcessorStep[RedactConfig]):
    name = "redact"
    version = "2"  # bumped whenever built-in detection changes (part of the policy version)

    def __init__(self, config: RedactConfig | None = None) -> None:
        super().__init__(config)
        cfg = self.config
        wanted = set(cfg.detectors)
        self.header_names = frozenset(CREDENTIAL_HEADERS | set(cfg.credential_headers))
        detectors: list[Detector] = []
        for d in BUILTIN:
            if d.name not in wanted:
                continue
            if d.name == HEADER_LABEL and cfg.credential_headers:
                d = header_detector(self.header_names, d.priority)
            detectors.append(d)
        for c in cfg.custom:
            detectors.append(Detector(c.name.upper(), re.compile(c.pattern), priority=30))
        self.detectors = tuple(detectors)
        self._gate = Gate(self.detectors)
        self.actions: dict[str, Action] = {d.name: cfg.action for d in detectors}
        self.actions.setdefault(HEADER_LABEL, cfg.action)
        self.actions.update({c.name.upper(): c.action for c in cfg.custom if c.action})
        self.actions.update({k.upper(): v for k, v in cfg.actions.items()})
        uses_hash = "hash" in self.actions.values() or any(f.action == "hash" for f in cfg.fields)
        key = cfg.hash_key or os.environ.get(cfg.hash_key_env)
        if uses_hash and not key:
            raise ConfigError(
                f"pipeline.redact: action 'hash' needs a key: set pipeline.redact.hash_key "
                f"or the environment variable {cfg.hash_key_env}"
            )
        self._key = key.encode() if key else b""
        self._rules = [(_parse_path(f.path), f.action) for f in cfg.fields]
        self._passwords_by_key = PASSWORD_LABEL in wanted
        self._key_labels: dict[str, str | None] = {}
        self.policy_version = self._policy_version()

    def _policy_version(self) -> str:
        """A stable hash of the effective policy (never of the HMAC key)."""
        cfg = self.config
        policy = {
            "step": [self.name, self.version],
            "detectors": [d.signature() for d in self.detectors],
            "actions": sorted(self.actions.items()),
            "fields": [[f.path, f.action] for f in cfg.fields],
            "credential_headers": sorted(self.header_names),
            "password_keys": _PASSWORD_KEY.pattern if self._passwords_by_key else None,
            "truncate_keep_chars": cfg.truncate_keep_chars,
            "scan": [cfg.scan_headers, cfg.scan_metadata],
        }
        digest = hashlib.sha256(orjson.dumps(policy, option=orjson.OPT_SORT_KEYS)).hexdigest()
        return f"sha256:{digest[:16]}"

    def __call__(self, event: Event) -> Event:
        counts: Counter[str] = Counter()
        out = dict(event)
        skip: set[tuple[Any, ...]] = set()
        for path, action in self._rules:
            self._apply_field_rule(out, path, action, counts, skip)
        cfg = self.config
        for top in ("input", "output"):
            if out.get(top) is not None:
                out[top] = self._scan(out[top], (top,), counts, skip, True)
        out["metadata"] = self._scan(
            out.get("metadata") or {}, ("metadata",), counts, skip, cfg.scan_metadata
        )
        out["headers"] = self._scan(
            out.get("headers") or {}, ("headers",), counts, skip, cfg.scan_headers
        )
        for key in ("user", "tenant"):  # enrich may have taken them from a header
            value = out.get(key)
            if isinstance(value, str) and value:
                out[key] = self._redact_text(value, counts)
        error = out.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            message = self._redact_text(error["message"], counts)  # providers echo input
            if message is not error["message"]:
                out["error"] = {**error, "message": message}
        outcome = "redacted" if counts else "clean"
        return record_step(
            out, self.name, self.version, outcome, counts, policy_version=self.policy_version
        )

    # -- scanning --------------------------------------------------------------------------------

    def _scan(
        self,
        value: Any,
        path: tuple[Any, ...],
        counts: Counter[str],
        skip: set[tuple[Any, ...]],
        text: bool,
    ) -> Any:
        """Redact under ``value`` (``text``: run the detectors on strings; credentials by name
        are always removed). Containers are copied only where something in them changed (the
        rest is shared with the input, which is never mutated); paths in ``skip`` (kept or
        already replaced by a field rule) are left as they are."""
        if skip and path in skip:
            return value
        if isinstance(value, str):
            return self._redact_text(value, counts) if text else value
        if isinstance(value, dict):
            copy = None
            labels = self._key_labels
            pair_label = self._name_value_label(value) if "value" in value else None
            for k, v in value.items():
                label = labels.get(k, "")
                if label == "":
                    label = self._key_label(k)
                if pair_label is not None and k == "value":
                    label = pair_label
                sub = (*path, k) if skip else path
                if label is not None and not (skip and sub in skip):
                    new = self._replace_all(v, label, counts)
                else:
                    new = self._scan(v, sub, counts, skip, text)
                if new is not v:
                    if copy is None:
                        copy = dict(value)
                    copy[k] = new
            return value if copy is None else copy
        if isinstance(value, list):
            items = None
            for i, v in enumerate(value):
                sub = (*path, i) if skip else path
                if (
                    isinstance(v, list | tuple)
                    and len(v) == 2
                    and isinstance(v[0], str)
                    and (label := self._key_label(v[0])) is not None
                ):
                    second = self._replace_all(v[1], label, counts)
                    item: Any = v if second is v[1] else [v[0], second]
                else:
                    item = self._scan(v, sub, counts, skip, text)
                if item is not v:
                    if items is None:
                        items = list(value)
                    items[i] = item
            return value if items is None else items
        return value

    def _key_label(self, key: Any) -> str | None:
        """The label of a key that names a credential, else None (memoised per key)."""
        if type(key) is not str:
            return None
        label = self._key_labels.get(key, "")
        if label != "":
            return label
        name = _normalise(key)
        if name in self.header_names:
            label = HEADER_LABEL
        elif self._passwords_by_key and _PASSWORD_KEY.fullmatch(key.strip()):
            label = PASSWORD_LABEL
        else:
            label = None
        if len(self._key_labels) < 4096:
            self._key_labels[key] = label
        return label

    def _name_value_label(self, value: dict[str, Any]) -> str | None:
        """``{"name": "Cookie", "value": ...}`` (HAR headers): the label of the name."""
        if "value" not in value:
            return None
        name = value.get("name")
        return self._key_label(name) if isinstance(name, str) else None

    def _replace_all(self, value: Any, label: str, counts: Counter[str]) -> Any:
        """``value`` (every string and number in it) replaced under ``label``."""
        if value is None or isinstance(value, bool) or value == "":
            return value
        if isinstance(value, str) and MARKER.fullmatch(value):  # redacted before (the producer)
            return value
        if isinstance(value, dict):
            return {k: self._replace_all(v, label, counts) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._replace_all(v, label, counts) for v in value]
        text = value if isinstance(value, str) else str(value)
        counts[label.lower()] += 1
        return self._replacement(label, text, self.actions.get(label, "mask"))

    def _redact_text(self, text: str, counts: Counter[str]) -> str:
        candidates = self._gate.candidates(text)
        if not candidates:
            return text
        matches = find_all(text, candidates)
        if not matches:
            return text
        parts: list[str] = []
        pos = 0
        for start, end, value, det in matches:
            parts.append(text[pos:start])
            parts.append(self._replacement(det.name, value, self.actions.get(det.name, "mask")))
            counts[det.name.lower()] += 1
            pos = end
        parts.append(text[pos:])
        return "".join(parts)

    def _replacement(self, label: str, value: str, action: str) -> str:
        if action == "mask":
            return f"[REDACTED:{label}]"
        if action == "hash":
            digest = hmac.new(self._key, value.encode(), hashlib.sha256).hexdigest()[:16]
            return f"[{label}:{digest}]"
        if action == "remove":
            return ""
        keep = self.config.truncate_keep_chars
        return f"{value[:keep]}…[TRUNCATED:{label}]"

    # -- field rules -----------------------------------------------------------------------------

    def _apply_field_rule(
        self,
        event: Event,
        path: list[str],
        action: str,
        counts: Counter[str],
        skip: set[tuple[Any, ...]],
    ) -> None:
        for container, key, concrete in _resolve(event, path):
            if action == "keep":
                skip.add(concrete)
                continue
            if action == "drop":
                if isinstance(container, dict):
                    del container[key]
                else:
                    container[key] = None
                counts["field_dropped"] += 1
                continue
            value = container[key]
            text = value if isinstance(value, str) else _json_text(value)
            container[key] = self._replacement("FIELD", text, action)
            skip.add(concrete)
            counts[f"field_{action}"] += 1


def _json_text(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


_PATH_PART = re.compile(r"([^.\[\]]+)|\[\*\]")


def _parse_path(path: str) -> list[str]:
    parts: list[str] = []
    for m in _PATH_PART.finditer(path):
        parts.append(m.group(1) if m.group(1) is not None else "*")
    return parts


def _resolve(root: Any, path: list[str]) -> list[tuple[Any, Any, tuple[Any, ...]]]:
    """(container, key, concrete path) for every value ``path`` addresses, copying on the way.

    Containers along the path are replaced by shallow copies so the input event is not mutated.
    """
    results: list[tuple[Any, Any, tuple[Any, ...]]] = []

    def walk(container: Any, i: int, concrete: tuple[Any, ...]) -> None:
        part = path[i]
        if isinstance(container, dict):
            keys = list(container) if part == "*" else ([part] if part in container else [])
        elif isinstance(container, list):
            keys = (
                list(range(len(container)))
                if part == "*"
                else ([int(part)] if part.isdigit() and int(part) < len(container) else [])
            )
        else:
            return
        for key in keys:
            if i == len(path) - 1:
                results.append((container, key, (*concrete, key)))
                continue
            child = container[key]
            if isinstance(child, dict):
                child = dict(child)
            elif isinstance(child, list):
                child = list(child)
            else:
                continue
            container[key] = child
            walk(child, i + 1, (*concrete, key))

    top = path[0]
    if top not in root or root[top] is None:
        return results
    value = root[top]
    root[top] = (
        dict(value)
        if isinstance(value, dict)
        else list(value)
        if isinstance(value, list)
        else value
    )
    if len(path) == 1:
        return [(root, top, (top,))]
    walk(root[top], 1, (top,))
    return results
