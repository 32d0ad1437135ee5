"""redact: remove personal data and secrets from everything people will read.

Scans every string in ``input`` and ``output`` (recursively), ``metadata`` values and
``headers`` values with the detectors (``detectors.py``) plus custom regexes, and applies field
rules by JSON path first. Actions:

- ``mask``: ``[REDACTED:EMAIL]``
- ``hash``: ``[EMAIL:1f0c9a...]``, HMAC-SHA256 with ``hash_key``: a stable pseudonym per value
- ``remove``: the matched text (or field) disappears
- ``truncate``: the first ``truncate_keep_chars`` characters stay, then ``…[TRUNCATED:EMAIL]``

Field rules (``[[pipeline.redact.fields]]``): ``path`` like ``input.user``,
``input.messages[*].name`` or ``metadata.*``; ``action`` is ``drop`` (remove the field),
``keep`` (never scanned) or one of the actions above (applied to the whole value).

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

from auditpipe.schemas import Event
from pydantic import Field, field_validator, model_validator

from auditpipe.errors import ConfigError
from auditpipe.settings import StrictModel

from .base import ProcessorStep
from .detectors import BUILTIN, BUILTIN_NAMES, Detector, Gate, find_all
from .steps import record_step

Action = Literal["mask", "hash", "remove", "truncate"]
FieldAction = Literal["mask", "hash", "remove", "truncate", "drop", "keep"]


class CustomDetector(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,40}$")
    pattern: str
    action: Action | None = None

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        return value


class FieldRule(StrictModel):
    path: str = Field(pattern=r"^(input|output|metadata|headers)(\.[^.\s]+|\[\*\])*$")
    action: FieldAction


class RedactConfig(StrictModel):
    detectors: list[str] = Field(
        default_factory=lambda: list(BUILTIN_NAMES),
        description="built-in detectors to run (default: all)",
    )
    action: Action = "mask"
    actions: dict[str, Action] = Field(default_factory=dict, description="per-detector action")
    custom: list[CustomDetector] = Field(default_factory=list)
    fields: list[FieldRule] = Field(default_factory=list)
    hash_key: str | None = Field(None, description="HMAC key for action 'hash'")
    hash_key_env: str = "AUDITPIPE_REDACT_HASH_KEY"
    truncate_keep_chars: int = Field(4, ge=0)
    scan_headers: bool = True
    scan_metadata: bool = True

    @field_validator("detectors")
    @classmethod
    def _known_detectors(cls, value: list[str]) -> list[str]:
        unknown = [d for d in value if d.upper() not in BUILTIN_NAMES]
        if unknown:
            raise ValueError(f"unknown detector(s) {unknown}; allowed: {', '.join(BUILTIN_NAMES)}")
        return [d.upper() for d in value]

    @model_validator(mode="after")
    def _actions_known(self) -> RedactConfig:
        names = set(BUILTIN_NAMES) | {c.name.upper() for c in self.custom}
        unknown = [k for k in self.actions if k.upper() not in names]
        if unknown:
            raise ValueError(f"actions: unknown detector(s) {unknown}")
        return self


class RedactStep(ProcessorStep):
    name = "redact"
    version = "1"
    Config = RedactConfig

    def __init__(self, config: StrictModel | None = None) -> None:
        super().__init__(config)
        cfg: RedactConfig = self.config  # type: ignore[assignment]
        wanted = set(cfg.detectors)
        detectors: list[Detector] = [d for d in BUILTIN if d.name in wanted]
        for c in cfg.custom:
            detectors.append(Detector(c.name.upper(), re.compile(c.pattern), priority=30))
        self.detectors = tuple(detectors)
        self._gate = Gate(self.detectors)
        self.actions: dict[str, Action] = {d.name: cfg.action for d in detectors}
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

    def __call__(self, event: Event) -> Event:
        counts: Counter[str] = Counter()
        out = dict(event)
        skip: set[tuple[Any, ...]] = set()
        for path, action in self._rules:
            self._apply_field_rule(out, path, action, counts, skip)
        cfg: RedactConfig = self.config  # type: ignore[assignment]
        for top in ("input", "output"):
            if out.get(top) is not None:
                out[top] = self._scan(out[top], (top,), counts, skip)
        if cfg.scan_metadata:
            out["metadata"] = self._scan(out.get("metadata") or {}, ("metadata",), counts, skip)
        if cfg.scan_headers:
            out["headers"] = self._scan(out.get("headers") or {}, ("headers",), counts, skip)
        outcome = "redacted" if counts else "clean"
        return record_step(out, self.name, self.version, outcome, counts)

    # -- scanning --------------------------------------------------------------------------------

    def _scan(
        self, value: Any, path: tuple[Any, ...], counts: Counter[str], skip: set[tuple[Any, ...]]
    ) -> Any:
        if not skip:  # no "keep" rule matched: no paths to track
            return self._scan_all(value, counts)
        if path in skip:
            return value
        if isinstance(value, str):
            return self._redact_text(value, counts)
        if isinstance(value, dict):
            return {k: self._scan(v, (*path, k), counts, skip) for k, v in value.items()}
        if isinstance(value, list):
            return [self._scan(v, (*path, i), counts, skip) for i, v in enumerate(value)]
        return value

    def _scan_all(self, value: Any, counts: Counter[str]) -> Any:
        """Redact every string under ``value``; containers are copied only where a string in
        them changed (the rest is shared with the input, which is never mutated)."""
        if isinstance(value, str):
            return self._redact_text(value, counts)
        if isinstance(value, dict):
            copy = None
            for k, v in value.items():
                new = self._scan_all(v, counts)
                if new is not v:
                    if copy is None:
                        copy = dict(value)
                    copy[k] = new
            return value if copy is None else copy
        if isinstance(value, list):
            items = None
            for i, v in enumerate(value):
                new = self._scan_all(v, counts)
                if new is not v:
                    if items is None:
                        items = list(value)
                    items[i] = new
            return value if items is None else items
        return value

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
        keep = self.config.truncate_keep_chars  # type: ignore[attr-defined]
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
    import orjson

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
