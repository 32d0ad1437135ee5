"""The base of every config model and the one way errors about them are worded.

Here, not in ``auditpipe.settings``, so that steps and sinks (which ``load_settings`` validates)
can build on it without importing the settings they are part of.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError

from .errors import ConfigError

__all__ = ["StrictModel", "format_validation_error", "validate_model"]


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


M = TypeVar("M", bound=BaseModel)


def validate_model(model: type[M], data: Any, origin: str, prefix: str = "") -> M:
    """``model.model_validate(data)`` with errors rewritten as one readable ConfigError."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, model, origin, prefix)) from None


def format_validation_error(
    exc: ValidationError, model: type[BaseModel], origin: str, prefix: str = ""
) -> str:
    lines = [f"{origin}: invalid settings"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in (*([prefix] if prefix else []), *err["loc"]))
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, err["loc"][:-1])
            hint = f"unknown key; allowed: {', '.join(allowed)}" if allowed else "unknown key"
            lines.append(f"  {loc}: {hint}")
        else:
            got = err.get("input")
            if isinstance(got, Mapping) or "password" in loc or isinstance(got, SecretStr):
                lines.append(f"  {loc}: {err['msg']}")  # a whole table may hold a secret
            else:
                lines.append(f"  {loc}: {err['msg']} (got {got!r})")
    return "\n".join(lines)


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    current: Any = model
    for part in loc:
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        current = fields[part].annotation
    fields = getattr(current, "model_fields", None)
    return sorted(fields) if fields else []
