"""enrich: cost, token estimates, tenant and user, static tags, input fingerprint, receive time.

- ``cost`` from the price table (USD per million input / output tokens): the shipped defaults
  below plus ``[pipeline.enrich.prices]``, matched on the exact model name, else the longest
  table key that prefixes it (``gpt-4o-2024-08-06`` -> ``gpt-4o``). No match, no cost.
- ``usage`` estimated (about 4 characters per token) when the event carries none; the event is
  then flagged ``usage_estimated`` and its cost ``estimated``.
- ``tenant`` / ``user`` from the first source that has a value: ``metadata:KEY`` or
  ``header:NAME``.
- ``tags``: static key/values (environment, region...).
- ``fingerprint``: SHA-256 of the canonical input (sorted keys, no whitespace), without the
  volatile keys in ``fingerprint_exclude``; equal prompts give equal fingerprints.
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import Any

import orjson
from auditpipe.schemas import Event
from pydantic import Field, field_validator

from auditpipe.settings import StrictModel

from .steps import ProcessorStep, record_step


class Price(StrictModel):
    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)


# USD per million tokens, as published by the providers (list prices; override in settings).
DEFAULT_PRICES: dict[str, Price] = {
    name: Price(input_per_mtok=i, output_per_mtok=o)
    for name, (i, o) in {
        "gpt-4o": (2.50, 10.00),
        "gpt-4o-mini": (0.15, 0.60),
        "gpt-4.1": (2.00, 8.00),
        "gpt-4.1-mini": (0.40, 1.60),
        "gpt-4.1-nano": (0.10, 0.40),
        "o3-mini": (1.10, 4.40),
        "claude-3-5-haiku": (0.80, 4.00),
        "claude-3-5-sonnet": (3.00, 15.00),
        "claude-3-7-sonnet": (3.00, 15.00),
        "claude-sonnet-4": (3.00, 15.00),
        "claude-opus-4": (15.00, 75.00),
        "text-embedding-3-small": (0.02, 0.0),
        "text-embedding-3-large": (0.13, 0.0),
        "demo-echo-1": (0.10, 0.20),
    }.items()
}

_SOURCE_HELP = "sources look like 'metadata:KEY' or 'header:NAME'"


def _check_sources(value: list[str]) -> list[str]:
    for s in value:
        kind, _, key = s.partition(":")
        if kind not in ("metadata", "header") or not key:
            raise ValueError(f"{s!r} is not a source; {_SOURCE_HELP}")
    return value


class EnrichConfig(StrictModel):
    prices: dict[str, Price] = Field(default_factory=dict, description="added to the defaults")
    use_default_prices: bool = True
    tenant_from: list[str] = Field(
        default_factory=lambda: ["metadata:tenant", "header:x-tenant-id"]
    )
    user_from: list[str] = Field(default_factory=lambda: ["metadata:user", "header:x-user-id"])
    tags: dict[str, str] = Field(default_factory=dict)
    estimate_usage: bool = True
    chars_per_token: float = Field(4.0, gt=0)
    fingerprint_exclude: list[str] = Field(
        default_factory=lambda: ["metadata", "user", "store", "stream", "stream_options"]
    )

    _check_tenant = field_validator("tenant_from")(_check_sources)
    _check_user = field_validator("user_from")(_check_sources)


class EnrichStep(ProcessorStep[EnrichConfig]):
    name = "enrich"
    version = "1"

    def __init__(self, config: EnrichConfig | None = None) -> None:
        super().__init__(config)
        cfg = self.config
        self.prices = {**(DEFAULT_PRICES if cfg.use_default_prices else {}), **cfg.prices}
        self._by_length = sorted(self.prices, key=len, reverse=True)

    def price_for(self, model: str | None) -> Price | None:
        if not model:
            return None
        if model in self.prices:
            return self.prices[model]
        bare = model.rsplit("/", 1)[-1]  # "openai/gpt-4o" -> "gpt-4o"
        for key in self._by_length:
            if bare.startswith(key) or model.startswith(key):
                return self.prices[key]
        return None

    def __call__(self, event: Event) -> Event:
        cfg = self.config
        out = dict(event)
        counts: dict[str, int] = {}
        usage = out.get("usage")
        estimated = False
        if (not usage or usage.get("total_tokens") is None) and cfg.estimate_usage:
            usage = self._estimate(out)
            out["usage"] = usage
            out["usage_estimated"] = estimated = True
            counts["usage_estimated"] = 1
        price = self.price_for(out.get("model"))
        if price is not None and usage:
            tin = usage.get("prompt_tokens") or 0
            tout = usage.get("completion_tokens") or 0
            cin = tin * price.input_per_mtok / 1e6
            cout = tout * price.output_per_mtok / 1e6
            out["cost"] = {
                "input_usd": round(cin, 10),
                "output_usd": round(cout, 10),
                "total_usd": round(cin + cout, 10),
                "estimated": estimated,
            }
            counts["cost"] = 1
        for field, sources in (("tenant", cfg.tenant_from), ("user", cfg.user_from)):
            if out.get(field) is None:
                value = _first_source(out, sources)
                if value is not None:
                    out[field] = value
                    counts[field] = 1
        if cfg.tags:
            out["tags"] = {**cfg.tags, **(out.get("tags") or {})}
        if out.get("input") is not None:
            out["fingerprint"] = self.fingerprint(out["input"])
        out["received_ts_ms"] = time.time_ns() // 1_000_000
        return record_step(out, self.name, self.version, "enriched", counts)

    def fingerprint(self, value: Any) -> str:
        cfg = self.config
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in cfg.fingerprint_exclude}
        canonical = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
        return hashlib.sha256(canonical).hexdigest()

    def _estimate(self, event: Event) -> dict[str, int]:
        cpt = self.config.chars_per_token
        prompt = math.ceil(_text_chars(event.get("input")) / cpt)
        completion = math.ceil(_text_chars(_completion_part(event.get("output"))) / cpt)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }


def _first_source(event: Event, sources: list[str]) -> str | None:
    for source in sources:
        kind, _, key = source.partition(":")
        table = event.get("metadata") if kind == "metadata" else event.get("headers")
        if table:
            value = table.get(key if kind == "metadata" else key.lower())
            if value:
                return str(value)
    return None


def _completion_part(output: Any) -> Any:
    if isinstance(output, dict) and "choices" in output:
        return output["choices"]
    return output


def _text_chars(value: Any) -> int:
    """Characters of the string content in ``value`` (message texts, not JSON syntax)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_text_chars(v) for k, v in value.items() if k not in ("model", "role", "id"))
    if isinstance(value, list):
        return sum(_text_chars(v) for v in value)
    return 0
