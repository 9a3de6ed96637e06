"""Per-source state kept in a changelog topic, so it survives restarts and rebalances.

Each batch writes, for every source it touched, one record to the changelog topic
(``--state-topic``, compacted, as many partitions as the input topic): key = the source,
partition = the input partition the source's events came from, value = its statistics
as JSON::

    {"v": 1, "offset": 1234, "ts": 1700000000.0, "features": ["cpu", "mem"],
     "count": 812, "mean": [0.41, 0.63], "var": [0.0021, 0.0009],
     "last": [0.40, 0.63], "move": [0.012, 0.001], "move_fast": [0.010, 0.001],
     "level": [0.3, -0.1], "still_share": [0.0, 0.2], "exceedance": 0.0003,
     "recent_exceedance": 0.0001,
     "season": {"since": 1699900000.0, "cycle": [0, 0], "visits": [12, 12, ...],
                "hours": "<base64>"}}

``last``, ``move``, ``move_fast``, ``level`` and ``still_share`` are the source's last
values, its long-run and recent movement, its recent level and how often it stands
still (``SourceNormalizer.temporal``);
records of format 1 lack them, and restore with none learned yet. ``exceedance`` (the
share of its events the fleet-wide rate would flag, ``consumer.calibration``) and
``recent_exceedance`` (the same over its last few dozen events) are optional in format
2: absent, or null, until the source has been judged. ``season``
(optional too) is the source's hour-of-day profile (``consumer.season``): the event
time it was first seen, each metric's cycle state (0 observing, 1 cycle, -1 none), and
while a metric is observed or has a cycle, the visits per hour and, as base64 of
little-endian float32, each hour's mean then variance per metric (2 x 24 x metrics: 1
KiB for 4 metrics, a third of the same as JSON numbers). A record without it restores
the source observing afresh.

``offset`` is the input offset the record reflects: the last offset of that input
partition in the batch. The records go out in the batch's own ``deliver`` call, so they
are acknowledged before the batch's offsets are committed (in exactly-once mode, in the
same transaction). A source silent for ``--state-ttl-seconds`` of stream time gets a
tombstone (key, no value), which always applies.

Restoring a partition reads its changelog partition to the end and keeps, per source,
the newest record stamped *before* the group's committed offset of the input partition:
a record at or past it comes from a batch that was never committed, and its events will
be read and learned again. Everything here is pure; the loop does the Kafka side.
"""

from __future__ import annotations

import base64
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from consumer.kafka_io import Message, json_value
from consumer.normalize import (
    EXCEEDANCE_SPANS,
    LONG_RUN,
    RECENT,
    FloatArray,
    SourceNormalizer,
    SourceRows,
    usual_step,
)
from consumer.season import HOURS, NO_CYCLE, SeasonRows

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
# Format 1 had no movement; its records still restore.
_READABLE_VERSIONS = (1, 2)
# The stream's time (the newest event time) decides which sources are silent; an event
# stamped in the future (allowed up to --max-future-seconds, a day by default) would
# make every other source look silent that long. It counts as at most this far ahead.
STREAM_AHEAD_SECONDS = 60.0


def stream_time(current: float, newest: float, now: float) -> float:
    """The stream's time after events up to ``newest``: it never goes back, and moves
    at most ``STREAM_AHEAD_SECONDS`` past the clock (``now``)."""
    return max(current, min(newest, now + STREAM_AHEAD_SECONDS))


@dataclass(frozen=True)
class Season:
    """A source's hour-of-day profile as the changelog carries it (see above); no
    ``visits`` and ``hours`` when none of its metrics needs one."""

    since: float | None
    cycle: tuple[int, ...]
    visits: tuple[int, ...] = ()
    hours: bytes = b""


@dataclass(frozen=True)
class SourceState:
    """One source's statistics as the changelog carries them."""

    offset: int
    ts: float
    features: tuple[str, ...]
    count: int
    mean: tuple[float, ...]
    var: tuple[float, ...]
    last: tuple[float, ...] = ()
    move: tuple[float, ...] = ()
    move_fast: tuple[float, ...] = ()
    level: tuple[float, ...] = ()
    still_share: tuple[float, ...] = ()
    exceedance: float | None = None
    recent_exceedance: float | None = None
    season: Season | None = None


def encode(state: SourceState) -> bytes:
    season = state.season
    return json_value(
        {
            "v": FORMAT_VERSION,
            "offset": state.offset,
            "ts": state.ts,
            "features": state.features,
            "count": state.count,
            "mean": state.mean,
            "var": state.var,
            "last": state.last,
            "move": state.move,
            "move_fast": state.move_fast,
            "level": state.level,
            "still_share": state.still_share,
            "exceedance": state.exceedance,
            "recent_exceedance": state.recent_exceedance,
            **(
                {}
                if season is None
                else {
                    "season": {
                        "since": season.since,
                        "cycle": season.cycle,
                        **(
                            {
                                "visits": season.visits,
                                "hours": base64.b64encode(season.hours).decode(),
                            }
                            if season.visits
                            else {}
                        ),
                    }
                }
            ),
        }
    )


class Unreadable(ValueError):
    """A changelog value this version cannot use (the reason is the message)."""


def decode(value: bytes) -> SourceState:
    try:
        doc = orjson.loads(value)
        if doc["v"] not in _READABLE_VERSIONS:
            readable = " and ".join(map(str, _READABLE_VERSIONS))
            raise Unreadable(f"format version {doc['v']!r}, this detector reads {readable}")
        state = SourceState(
            offset=int(doc["offset"]),
            ts=float(doc["ts"]),
            features=tuple(str(f) for f in doc["features"]),
            count=int(doc["count"]),
            mean=tuple(float(x) for x in doc["mean"]),
            var=tuple(float(x) for x in doc["var"]),
            last=tuple(float(x) for x in doc.get("last", ())),
            move=tuple(float(x) for x in doc.get("move", ())),
            move_fast=tuple(float(x) for x in doc.get("move_fast", ())),
            level=tuple(float(x) for x in doc.get("level", ())),
            still_share=tuple(float(x) for x in doc.get("still_share", ())),
            exceedance=_share(doc, "exceedance"),
            recent_exceedance=_share(doc, "recent_exceedance"),
            season=_season(doc.get("season")),
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, Unreadable):
            raise
        raise Unreadable(f"not a state record ({type(exc).__name__}: {exc})") from None
    n = len(state.features)
    if len(state.mean) != n or len(state.var) != n or state.count < 0:
        raise Unreadable("mean, var and features differ in length")
    recent = (state.last, state.move, state.move_fast, state.level, state.still_share)
    if any(len(x) not in (0, n) for x in recent):
        raise Unreadable("movement and features differ in length")
    season = state.season
    if season is not None and (
        len(season.cycle) != n
        or not set(season.cycle) <= {-1, 0, 1}
        or len(season.visits) not in (0, HOURS)
        or len(season.hours) != (2 * HOURS * n * 4 if season.visits else 0)
    ):
        raise Unreadable("season and features differ in shape")
    if season is not None and not _sound(season):
        raise Unreadable("season holds impossible numbers")
    return state


def _sound(season: Season) -> bool:
    """A profile the detector could have written: a finite first time, visits in
    range, finite means and variances, no variance below 0, and a profile for every
    metric still observed or with a cycle."""
    if season.since is not None and not math.isfinite(season.since):
        return False
    if not season.visits:
        return all(c == NO_CYCLE for c in season.cycle)
    if not all(0 <= v < 2**31 for v in season.visits):
        return False
    hours = np.frombuffer(season.hours, dtype="<f4").reshape(2, HOURS, -1)
    return bool(np.isfinite(hours).all() and (hours[1] >= 0).all())


def _season(doc: object) -> Season | None:
    if doc is None:
        return None
    if not isinstance(doc, dict):
        raise TypeError(f"season {doc!r} is not an object")
    since, cycle, visits = doc.get("since"), doc["cycle"], doc.get("visits", [])
    if not (
        (since is None or type(since) in (int, float))
        and isinstance(cycle, list)
        and isinstance(visits, list)
        and all(type(x) is int for x in (*cycle, *visits))
    ):
        raise TypeError("season's since, cycle or visits is not of its type")
    return Season(
        since=None if since is None else float(since),
        cycle=tuple(cycle),
        visits=tuple(visits),
        hours=base64.b64decode(doc.get("hours", ""), validate=True),
    )


def seasons(rows: SeasonRows) -> list[Season]:
    """Each row's profile for the changelog; the arrays converted once for all rows
    (per row, a record's profile took longer to build than the rest of the record)."""
    since = [None if math.isnan(t) else t for t in rows.since.tolist()]
    cycles = [tuple(c) for c in rows.cycle.tolist()]
    kept = (rows.cycle != NO_CYCLE).any(axis=1).tolist()
    hours = np.ascontiguousarray(np.stack([rows.mean, rows.var], axis=1), dtype="<f4")
    visits = rows.visits.tolist()
    return [
        Season(since[i], cycles[i], tuple(visits[i]), hours[i].tobytes())
        if kept[i]
        else Season(since[i], cycles[i])
        for i in range(len(cycles))
    ]


def _known(share: np.float64) -> float | None:
    """A share from the table as the changelog keeps it: NaN (none yet) is null."""
    return None if math.isnan(share) else float(share)


def _share(doc: dict[str, Any], field: str) -> float | None:
    """An optional share of a record: null or absent is None (none yet)."""
    value = doc.get(field)
    if value is None:
        return None
    share = float(value)
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"{field} {share!r} is not a share")
    return share


@dataclass
class Restored:
    """What a partition's changelog says, read in order (``apply`` each record)."""

    committed: int
    sources: dict[str, SourceState] = field(default_factory=dict)
    records: int = 0
    skipped_newer: int = 0
    unreadable: int = 0

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        """One changelog record: a tombstone forgets the source; a state record stamped
        before ``committed`` replaces what came before it; a newer one is skipped."""
        self.records += 1
        if key is None:
            self.unreadable += 1
            return
        source = key.decode(errors="replace")
        if value is None:
            self.sources.pop(source, None)
            return
        try:
            state = decode(value)
        except Unreadable as exc:
            self.unreadable += 1
            logger.debug("changelog record of %s skipped: %s", source, exc)
            return
        if state.offset >= self.committed:
            self.skipped_newer += 1
            return
        self.sources[source] = state


class StateTracker:
    """Which input partition each known source lives in, and when it was last seen
    (stream time: the newest event time, at most a minute past the wall clock), for the
    changelog records and the time-to-live. Used in the scoring
    thread under the detector's state lock."""

    def __init__(
        self, topic: str, ttl_seconds: float, clock: Callable[[], float] = time.time
    ) -> None:
        self.topic = topic
        self.ttl_seconds = ttl_seconds
        self.clock = clock
        self.where: dict[str, tuple[int, float]] = {}
        self.stream_ts = 0.0
        self._swept_at = 0.0

    def touch(self, sources: Sequence[str], partitions: Sequence[int], ts: Sequence[float]) -> None:
        """Each source lives in the partition of its last event, and was last seen at the
        stream time after this batch. Silence is counted in the stream's time, not
        against the source's own clock: a source that reports late, or (a replayed fleet
        of series from different years) on a clock of its own, is not silent while it
        reports, and is not forgotten between two of its batches. Per source of the
        batch, not per event: a Python loop over a 20,000-event batch cost about 0.5 us
        an event (thread time, 300 sources)."""
        if not len(sources) == len(partitions) == len(ts):
            raise ValueError("touch needs one partition and one ts per source")
        if len(ts):
            self.stream_ts = stream_time(self.stream_ts, max(ts), self.clock())
        now = self.stream_ts
        where = self.where
        for source, partition in dict(zip(sources, partitions, strict=True)).items():
            where[source] = (partition, now)

    def forget(self, sources: Sequence[str]) -> None:
        for source in sources:
            self.where.pop(source, None)

    def of_partitions(self, partitions: set[int]) -> list[str]:
        return [s for s, (p, _) in self.where.items() if p in partitions]

    def expired(self) -> list[tuple[str, int]]:
        """Sources silent for the time-to-live of stream time, forgotten here; checked at
        most every tenth of the TTL of stream time (a scan of every known source)."""
        now = self.stream_ts
        if now - self._swept_at < self.ttl_seconds / 10:
            return []
        self._swept_at = now
        cutoff = now - self.ttl_seconds
        gone = [(s, p) for s, (p, t) in self.where.items() if t < cutoff]
        for source, _ in gone:
            del self.where[source]
        return gone

    def messages(
        self,
        sources: list[str],
        offsets: dict[int, int],
        features: tuple[str, ...],
        stats: SourceRows,
        expired: list[tuple[str, int]],
    ) -> list[Message]:
        """The changelog records of one batch: each touched source's statistics, stamped
        with the last offset of its partition in the batch, then the tombstones."""
        messages = []
        profiles = None if stats.season is None else seasons(stats.season)
        for i, source in enumerate(sources):
            partition, ts = self.where[source]
            state = SourceState(
                offset=offsets[partition],
                ts=ts,
                features=features,
                count=int(stats.count[i]),
                mean=tuple(stats.mean[i].tolist()),
                var=tuple(stats.var[i].tolist()),
                last=tuple(stats.last[i].tolist()),
                move=tuple(stats.move[i].tolist()),
                move_fast=tuple(stats.move_fast[i].tolist()),
                level=tuple(stats.level[i].tolist()),
                still_share=tuple(stats.still_share[i].tolist()),
                exceedance=_known(stats.exceedance[i, LONG_RUN]),
                recent_exceedance=_known(stats.exceedance[i, RECENT]),
                season=None if profiles is None else profiles[i],
            )
            messages.append(Message(self.topic, source.encode(), encode(state), [], partition))
        for source, partition in expired:
            messages.append(Message(self.topic, source.encode(), None, [], partition))
        return messages


def last_offsets(partitions: Sequence[int], offsets: Sequence[int]) -> dict[int, int]:
    """Per partition, the highest of the offsets (a batch's records, in any order)."""
    last: dict[int, int] = {}
    for p, o in zip(partitions, offsets, strict=True):
        if o > last.get(p, -1):
            last[p] = o
    return last


def as_rows(states: Sequence[SourceState]) -> SourceRows:
    """Restored states as the normalizer's rows.

    A format-1 record has no movement: its source restarts as if it had moved as
    independent noise of its spread would (a mean step of 2 / sqrt(pi) standard
    deviations), from its mean, at its usual level. Left at 0 beside a count of
    hundreds, its first step would be its whole value and its long run would climb
    from 0 at the slow rate: stillness near -6, then -1 for a hundred events."""
    n = len(states)
    width = len(states[0].mean) if states else 0

    def column(name: str, default: Callable[[SourceState], Sequence[float]]) -> FloatArray:
        values = [getattr(s, name) or default(s) for s in states]
        return np.array(values, dtype=np.float64).reshape(n, width)

    def usual(s: SourceState) -> list[float]:
        steps: list[float] = usual_step(np.array(s.var)).tolist()
        return steps

    zeros: Callable[[SourceState], Sequence[float]] = lambda s: (0.0,) * width  # noqa: E731
    count = np.fromiter((s.count for s in states), dtype=np.int64, count=n)
    since = np.full(n, np.nan)
    cycle = np.zeros((n, width), dtype=np.int8)
    visits = np.zeros((n, HOURS), dtype=np.int64)
    hours = np.zeros((n, 2, HOURS, width))
    for i, s in enumerate(states):
        # No season (an older record): observing afresh from the source's next event.
        if s.season is None:
            continue
        since[i] = np.nan if s.season.since is None else s.season.since
        cycle[i] = s.season.cycle
        if s.season.visits:
            visits[i] = s.season.visits
            hours[i] = np.frombuffer(s.season.hours, dtype="<f4").reshape(2, HOURS, width)
    return SourceRows(
        count,
        column("mean", zeros),
        column("var", zeros),
        column("last", lambda s: s.mean),
        column("move", usual),
        column("move_fast", usual),
        column("level", zeros),
        column("still_share", zeros),
        # None (none yet) is NaN.
        np.array([[s.exceedance, s.recent_exceedance] for s in states], dtype=np.float64).reshape(
            n, EXCEEDANCE_SPANS
        ),
        SeasonRows(since, cycle, visits, hours[:, 0], hours[:, 1]),
    )


class Changelog:
    """The changelog side of the detector's per-source statistics (scoring thread,
    under the state lock): the records of a judged batch, and restored state loaded."""

    def __init__(
        self, topic: str, ttl_seconds: float, clock: Callable[[], float] = time.time
    ) -> None:
        self.tracker = StateTracker(topic, ttl_seconds, clock)
        # The feature names, once the detector knows them (the first event may tell).
        self.features: tuple[str, ...] | None = None
        # Restored before the detector existed: loaded into it once it does.
        self.pending: dict[str, SourceState] = {}
        self.expired_total = 0

    def batch_messages(
        self,
        normalizer: SourceNormalizer,
        sources: list[str],
        partitions: list[int],
        offsets: list[int],
        ts: list[float],
    ) -> list[Message]:
        """After a batch was judged: one record per touched source, plus tombstones of
        the sources silent for the time-to-live (which leave the normalizer here)."""
        assert self.features is not None
        tracker = self.tracker
        tracker.touch(sources, partitions, ts)
        expired = tracker.expired()
        if expired:
            normalizer.forget([s for s, _ in expired])
            self.expired_total += len(expired)
        touched = [s for s in dict.fromkeys(sources) if s in tracker.where]
        kept, rows = normalizer.export_rows(touched)
        last = last_offsets(partitions, offsets)
        return tracker.messages(kept, last, self.features, rows, expired)

    def load(
        self, normalizer: SourceNormalizer | None, restored: dict[int, dict[str, SourceState]]
    ) -> int:
        """Install restored sources (per input partition); how many were loaded. With no
        detector yet, they wait in ``pending`` for ``load_pending``."""
        loaded = 0
        for partition, sources in restored.items():
            for source, state in sources.items():
                self.tracker.where[source] = (partition, state.ts)
                self.pending[source] = state
                loaded += 1
        if normalizer is not None:
            self.load_pending(normalizer)
        return loaded

    def load_pending(self, normalizer: SourceNormalizer) -> None:
        """Move the pending sources into the normalizer; those written with other
        features than the detector's are dropped with a log line."""
        pending, self.pending = self.pending, {}
        if not pending:
            return
        if self.features is None:
            self.pending = pending  # the features are not known yet
            return
        fits = {s: st for s, st in pending.items() if st.features == self.features}
        if len(fits) < len(pending):
            logger.warning(
                "%d restored source(s) dropped: written with other features than %s",
                len(pending) - len(fits),
                ",".join(self.features),
            )
            self.tracker.forget([s for s in pending if s not in fits])
        names = list(fits)
        normalizer.import_rows(names, as_rows([fits[s] for s in names]))

    def forget_except(self, normalizer: SourceNormalizer | None, keep: set[int]) -> int:
        """Drop every known source whose partition is not in ``keep``; how many. Sources
        the tracker never saw (learned only by held, uncommitted batches) go too."""
        where = self.tracker.where
        gone = [s for s, (p, _) in where.items() if p not in keep]
        self.tracker.forget(gone)
        self.pending = {s: st for s, st in self.pending.items() if s in where}
        if normalizer is not None:
            normalizer.forget([s for s in normalizer.sources() if s not in where])
        return len(gone)
