"""The ledger (``batchkit/_core/_ledger.py``) alone, without an event loop: every request is
settled exactly once, the counters add up and never go down, and the records of callers'
threads count the same whether merged for good or shown in a snapshot before that."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from batchkit import DeadlineExceeded
from batchkit._core._ledger import Ledger
from batchkit._core._requests import Request
from batchkit._core._stats import Recorder, Statistics

N = 12  # requests per example


class Recorded(Request):
    """A request that records every outcome it is given (so a second one shows)."""

    __slots__ = ("outcomes",)

    def __init__(self, seq: int) -> None:
        super().__init__(seq, 0, seq, 0.0, None, 1.0)
        self.outcomes: list[tuple[str, Any]] = []

    def deliver(self, value: Any) -> None:
        self.outcomes.append(("value", value))

    def deliver_error(self, exc: BaseException) -> None:
        self.outcomes.append(("error", exc))


def snapshot(rec: Recorder) -> Statistics:
    return rec.snapshot(
        name="m", model_version="1", queue_depth=0, waiting_for_room=0, in_flight_batches=0
    )


COUNTERS = ("completed", "failed", "expired", "cancelled")

one = st.tuples(st.sampled_from(["cancel", "expire", "fail"]), st.integers(0, N - 1))
batch = st.tuples(
    st.just("batch"),
    st.lists(st.tuples(st.integers(0, N - 1), st.booleans()), min_size=1, max_size=N),
)


@given(st.lists(st.one_of(one, batch), max_size=40))
def test_each_request_is_settled_once_and_the_counters_add_up(ops: list[Any]) -> None:
    rec = Recorder()
    ledger = Ledger("m", rec)
    reqs = [Recorded(i) for i in range(N)]
    settled: set[int] = set()
    last = dict.fromkeys(COUNTERS, 0)
    for op in ops:
        if op[0] == "batch":
            members = list(dict.fromkeys(i for i, _ in op[1]))  # a request is in one batch once
            fails = dict(op[1])
            outputs = [ValueError(i) if fails[i] else i * 10 for i in members]
            ledger.deliver_batch([reqs[i] for i in members], outputs, 1.0, 2.0, "v1")
            settled.update(members)
        else:
            kind, i = op
            first = i not in settled
            if kind == "cancel":
                assert ledger.cancel(reqs[i]) is first
            elif kind == "expire":
                assert ledger.expire(reqs[i]) is first
            else:
                assert ledger.fail(reqs[i], RuntimeError("closed")) is first
            settled.add(i)
        stats = snapshot(rec)
        now = {key: getattr(stats, key) for key in COUNTERS}
        assert all(now[key] >= last[key] for key in COUNTERS), (last, now)  # never go down
        assert sum(now.values()) == len(settled)  # they add up
        last = now
    for i, req in enumerate(reqs):
        assert req.finished is (i in settled)
        cancelled_quietly = req.finished and not req.outcomes
        assert len(req.outcomes) == (0 if cancelled_quietly or not req.finished else 1)
    assert sum(1 for r in reqs if r.finished and not r.outcomes) == last["cancelled"]


@given(st.lists(st.integers(0, N - 1), min_size=1, max_size=N, unique=True))
def test_a_batch_answers_each_caller_with_its_own_output(members: list[int]) -> None:
    rec = Recorder()
    ledger = Ledger("m", rec)
    reqs = [Recorded(i) for i in members]
    ledger.expire(reqs[0])  # settled before the batch ended: skipped, counted once
    outputs = [KeyError(i) if i % 3 == 0 else i + 100 for i in members]
    ledger.deliver_batch(reqs, outputs, 1.0, 2.0, "v7")
    kind, exc = reqs[0].outcomes[0]
    assert kind == "error" and isinstance(exc, DeadlineExceeded)
    for req, out in zip(reqs[1:], outputs[1:], strict=True):
        assert req.outcomes == [("error", out) if isinstance(out, Exception) else ("value", out)]
        assert req.version == "v7"
    stats = snapshot(rec)
    assert stats.expired == 1
    assert stats.failed == sum(isinstance(o, Exception) for o in outputs[1:])
    assert stats.completed == len(members) - 1 - stats.failed


records = st.lists(
    st.integers(1, 6).flatmap(
        lambda n: st.tuples(
            st.just(0.0),
            st.just(1.0),
            st.just([0.0] * n),
            st.integers(0, n),
            st.just(0),
        )
    ),
    max_size=8,
)


@given(records, st.integers(0, 5), st.integers(0, 3), st.integers(0, 3))
def test_records_count_the_same_shown_early_or_merged(
    recs: list[Any], left: int, running: int, waiting: int
) -> None:
    rec = Recorder()
    ledger = Ledger("m", rec)
    for start, end, enqueued, failed, _ in recs:
        ledger.add_record((start, end, enqueued, failed, 0))
    for _ in range(left):
        ledger.add_left()
    _, unmerged, gone = ledger.unmerged()
    early = ledger.with_records(snapshot(rec), running, waiting, unmerged, gone)
    ledger.merge()
    _, unmerged, gone = ledger.unmerged()
    merged = ledger.with_records(snapshot(rec), running, waiting, unmerged, gone)
    for key in ("submitted", "completed", "failed", "cancelled", "batches", "batch_sizes"):
        assert getattr(early, key) == getattr(merged, key), key
    assert merged.submitted == sum(len(r[2]) for r in recs) + left + running + waiting
    assert merged.completed + merged.failed + merged.cancelled == merged.submitted - (
        running + waiting
    )
