"""Small helpers for tests that read and write topics directly (shipped in auditpipe.testing)."""

from __future__ import annotations

import asyncio
from typing import Any

from auditpipe.testing import consume, produce

__all__ = ["consume", "produce", "run"]


def run(coro: Any) -> Any:
    return asyncio.run(coro)
