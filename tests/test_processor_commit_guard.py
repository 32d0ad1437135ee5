"""The processor never commits past a record it did not acknowledge (found by `auditpipe soak`:
faust-streaming 0.15.3 commits C+2 when C is unacknowledged and C+1 is). Real Faust consumer
objects of the processor app, no broker needed: the commit decision is pure bookkeeping."""

from __future__ import annotations

from auditpipe.processors.app import create_app
from faust.types import TP
from intervaltree import IntervalTree

from auditpipe.settings import Settings

TPR = TP("auditpipe.raw", 0)


def _consumer(committed: int | None, acked: list[int], gap: tuple[int, int] | None = None):
    app = create_app(Settings.model_validate({"kafka": {"bootstrap": "127.0.0.1:1"}}))
    consumer = app.consumer
    consumer._committed_offset[TPR] = committed
    consumer._acked[TPR] = list(acked)
    consumer._acked_index[TPR] = set(acked)
    if gap is not None:
        consumer._gap[TPR] = IntervalTree.from_tuples([gap])
    return consumer


def test_no_commit_past_an_unacknowledged_record() -> None:
    # offset 10 is the next record to read; 11 is acknowledged, 10 is not
    assert _consumer(10, [11])._new_offset(TPR) is None
    assert _consumer(10, [11, 12, 13])._new_offset(TPR) is None
    assert _consumer(10, [12])._new_offset(TPR) is None  # Faust's own check (more than one)


def test_commits_what_was_acknowledged_in_order() -> None:
    assert _consumer(10, [10])._new_offset(TPR) == 11
    assert _consumer(10, [10, 11, 12, 14])._new_offset(TPR) == 13
    assert _consumer(None, [0, 1])._new_offset(TPR) == 2


def test_offsets_faust_knows_as_gaps_still_count() -> None:
    # offset 10 is a gap (no record there: a transaction marker, compaction)
    assert _consumer(10, [11], gap=(10, 11))._new_offset(TPR) == 12
