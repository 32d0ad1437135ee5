"""Erasure and retention across every store that holds records.

Modules: ``selector`` (which records: one person, tenant, request, event or caller-metadata
pairs, within a time window), ``erasure`` (the :class:`Erasable` protocol the sinks implement,
receipts, the erasure event, running one erasure over many stores), crypto-shredding in
``keys`` (per-subject data keys: SQLite or PostgreSQL key store, optional master key),
``envelope`` (sealing input/output for sinks with ``encrypt_content``, ``decrypt_event``) and
``shredding`` (what ``erase`` does with a subject's keys). See docs/privacy.md.
"""

from .selector import Selector, SelectorError

__all__ = ["Selector", "SelectorError"]
