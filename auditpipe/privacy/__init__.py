"""Erasure and retention across every store that holds records.

Modules: ``selector`` (which records: one person, tenant, request, event or caller-metadata
pairs, within a time window), ``erasure`` (the :class:`Erasable` protocol the sinks implement,
receipts, the erasure event, running one erasure over many stores) and ``retention`` (what ages
out per sink). See docs/privacy.md.
"""

from .selector import Selector, SelectorError

__all__ = ["Selector", "SelectorError"]
