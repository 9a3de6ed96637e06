"""Replaying a stream through the detector's own pure parts, batch by batch as the service does.

The service (``consumer.pipeline``) prepares each closed window against the statistics
as they stand, judges it with the current model, and refits when the schedule says so.
Before the first model exists it learns every batch unjudged and holds it with each
event's features as they stood at that event; once the first model is installed it
scores the held batches on those features (no hindsight) and refits at once. ``replay`` does the
same with no Kafka and no asyncio, and fits in line (the service fits in another
process while later windows wait in the hold), so that studies and the NAB evaluation
can run the detector over millions of events in minutes and always in the same order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from consumer.detector import Detector, Prepared, Verdict
from consumer.events import Event
from consumer.model import fit_model

# consumer.pipeline: below this many history rows a forced first fit uses the held
# events themselves.
MIN_FORCED_TRAINING = 10


@dataclass(frozen=True)
class Judged:
    """One batch's verdict: ``batch`` is its position in the replayed stream."""

    batch: int
    prepared: Prepared
    verdict: Verdict


def replay(
    detector: Detector,
    batches: Iterable[tuple[float, list[Event]]],
    *,
    hold_cold_start: bool = True,
    max_held_events: int = 200_000,
) -> Iterator[Judged]:
    """Judge ``(now, events)`` batches in order, refitting when ``detector.fit_due(now)``.

    ``now`` is the clock the refit schedule reads (the service's wall clock at the
    window's close). With ``hold_cold_start`` the batches seen before the first model
    are judged once it exists, as the service does (yielded then, out of order);
    without it they only teach the statistics and the history and are never judged.
    ``max_held_events`` forces the first fit as the service's option of that name does.
    """
    held: list[tuple[int, Prepared]] = []
    for index, (now, events) in enumerate(batches):
        if not events:
            continue
        prepared = detector.prepare(events)
        if detector.model is None:
            prepared = detector.learn_unjudged(prepared)
            if hold_cold_start:
                held.append((index, prepared))
        else:
            judged, verdict = detector.judge(prepared, detector.model)
            yield Judged(index, judged, verdict)
        forced = detector.model is None and sum(len(p) for _, p in held) >= max_held_events
        if detector.fit_due(now) or forced:
            training, version = detector.training_set(now)
            if forced and len(training) < MIN_FORCED_TRAINING:
                training = np.concatenate([p.features for _, p in held])
            model = fit_model(
                training, detector.settings.fit, version=version, fitted_at=now,
                layout=detector.layout,
            )  # fmt: skip
            detector.install(model)
            if held:
                yield from _drain(detector, held)
                held = []


def _drain(detector: Detector, held: list[tuple[int, Prepared]]) -> Iterator[Judged]:
    """The held batches scored by the first model on the features they had when they
    arrived (they learned then), then a refit at once, as ``Processor._drain_held`` does."""
    assert detector.model is not None
    for index, prepared in held:
        yield Judged(index, prepared, detector.score(prepared, detector.model, learn=True))
    detector.cold_start_over()
