"""The detector proper, free of Kafka and asyncio: batches of events in, scores out.

Like an online detector it has two halves, ``score`` and ``learn``: a batch is first
scored against the per-source statistics and the model as they stand, then it teaches
the statistics and the training history. What it learns never depends on what is
reported: an event far out by its per-source z-scores or its source's stillness
(model-free measures) is kept out of the history and moves its source's statistics
only clipped, whatever the threshold. ``judge`` does both, and the service runs it in
its scoring thread while the loop parses the next batch; the loop prepares that batch
only once the judging is over. ``score`` alone reads state only, so the HTTP endpoint
may call it from its own threads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Self

import numpy as np

from consumer.calibration import calibrated, calibrated_highest, walk
from consumer.events import Event, Events
from consumer.model import (
    NO_TESTS,
    PER_EVENTS,
    FitParams,
    FittedModel,
    History,
    Layout,
    RefitSchedule,
)
from consumer.normalize import (
    LONG_RUN,
    BoolArray,
    FloatArray,
    IntArray,
    SourceNormalizer,
    ranks,
)


@dataclass(frozen=True)
class Prepared:
    """A batch's events as arrays, with the features the model sees."""

    events: Events
    rows: IntArray
    values: FloatArray
    features: FloatArray
    warmed: BoolArray

    def __len__(self) -> int:
        return len(self.events)

    def select(self, keep: BoolArray) -> Self:
        """The same batch restricted to the events where ``keep`` is true."""
        return type(self)(
            events=self.events.select(keep),
            rows=self.rows[keep],
            values=self.values[keep],
            features=self.features[keep],
            warmed=self.warmed[keep],
        )


@dataclass(frozen=True)
class Verdict:
    """Scores of a prepared batch under one model, and which events are anomalies.

    ``false_alarm_rates`` calibrates each score: the expected false alarms per 10,000
    normal events of a threshold at that score, under the model that gave it; unlike
    the raw score, comparable across model versions. It decides (with the budget).
    ``source_rates`` reads the same rates against each source's own alarms
    (``consumer.calibration``), so that they also compare across sources: a noisy
    source's alarms rank below a quiet one's. ``anomaly_rates`` reads them against the
    source's long-run or recent alarms, whichever share is higher: what an anomaly
    publishes. With no budget, both are the rates themselves.
    """

    scores: FloatArray
    anomalous: BoolArray
    model: FittedModel
    false_alarm_rates: FloatArray
    source_rates: FloatArray
    anomaly_rates: FloatArray


def rounds(rows: IntArray, per_source: int, warming: IntArray | None = None) -> list[IntArray]:
    """Positions of a batch's events split into rounds of at most ``per_source`` events
    of any one source: round r holds each source's events number r * per_source up to
    (r + 1) * per_source - 1, in batch order.

    ``warming`` (per event: how many events its source still lacks to be warmed at the
    batch's start) ends a young source's first round where its warm-up ends, so that
    its events from then on are judged as warmed, as they would be one at a time.

    Each source's events keep their order across rounds, which is all its statistics
    depend on; events of different sources are independent of each other.
    """
    n = len(rows)
    if n == 0:
        return []
    rank = ranks(rows)
    round_of = rank // per_source
    if warming is not None and warming.any():
        young = warming > 0
        past = rank - warming
        round_of = np.where(young, np.where(past < 0, 0, 1 + past // per_source), round_of)
    if round_of.max() == 0:
        return [np.arange(n)]
    by_round = np.argsort(round_of, kind="stable")
    return np.split(by_round, np.flatnonzero(np.diff(round_of[by_round])) + 1)


_STILLNESS_FLOOR = 1.0
# The relation's residual is heavy-tailed in normal traffic (latency grows with load
# non-linearly; a source's level takes a while to settle after an episode): with a least
# threshold of 4 sd the simulator at 0.19% anomalous flagged 3.0 normal events per
# 10,000 for a budget of 1, with 6 sd 1.9, at the same episode recall (recent level's
# half-life 4 events, untrimmed fit).
_RELATION_FLOOR = 6.0


@dataclass(frozen=True)
class DetectorSettings:
    """The detector's knobs, as the configuration gives them."""

    normalize: bool = True
    halflife_events: float = 200.0
    warmup_events: int = 20
    max_sources: int = 100_000
    history_size: int = 50_000
    min_train: int = 2_000
    refit_seconds: float = 60.0
    refit_events: int = 0
    # An event with a z-score beyond this in any metric of a warmed source never enters
    # the history, and moves its source's statistics only clipped (see ``learn``).
    outlier_z: float = 5.0
    # Likewise a source whose recent movement fell under e^-1.5 (22%) of its usual: stuck
    # values would otherwise fill the history at high anomaly rates and teach the
    # stillness test's tail that standing still is normal.
    outlier_stillness: float = 1.5
    # Each source's exceedance share (``consumer.calibration``) forgets with this
    # half-life, in its events; a young source's share is a plain mean with the
    # budget's share b counted as 1/b events (one alarm's worth). On NAB's development
    # subset (NAB's threshold on the published anomalies' source rates; standard
    # profile), half-lives of 1,000, 5,000, 20,000 and 100,000 events with no such
    # prior gave 34.6, 38.1, 41.1 and 41.0 (14.2 with the fleet's rates alone); 20,000
    # with a prior of 1,000 events 26.8 (early false alarms of a young source silenced
    # it), of 1/b 38.8. Without a prior, a young source's share stays near b for
    # thousands of events: a unit test's heavy-tailed source, 600 events old, still
    # outranked a quiet source's outlier. 20,000 events is 2.3 days of a source
    # reporting every 10 s: a source noisy last week is trusted again.
    calibration_halflife_events: float = 20_000.0
    # The same share over a source's last events (0: not kept; it needs the long-run
    # share, calibration_halflife_events > 0), and an anomaly's published rate read
    # against whichever share is higher: an anomaly right after others of its source
    # is less news than the first (HTM's anomaly likelihood reads its scores against
    # the last few likewise). It changes no decision, only how the
    # anomalies rank. On NAB's development subset (published anomalies, offline;
    # standard / low FP), half-lives of 8, 15, 20, 30 and 60 events gave 50.8 / 41.8,
    # 53.1 / 41.0, 53.1 / 37.6, 52.8 / 36.2 and 47.3 / 32.1, against 43.2 / 34.1
    # without; longer, an alarm also ranks down a real anomaly a hundred events later.
    # The incidents keep the long-run rate: they group a run themselves, and read
    # against the recent share too they scored 46.2 instead of 49.7.
    recent_halflife_events: float = 15.0
    # A metric whose hour of the day explains at least this share of its variance over
    # its source's first two days is judged on its value less that hour's usual
    # (``consumer.season``, where the figures are); None: never.
    cycle_share: float | None = 0.5
    fit: FitParams = field(default_factory=FitParams)


class Detector:
    """Per-source normalisation, training history, refit schedule and current model."""

    def __init__(self, n_features: int, settings: DetectorSettings = DetectorSettings()) -> None:
        self.settings = settings
        self.normalizer = SourceNormalizer(
            n_features,
            halflife_events=settings.halflife_events,
            warmup_events=settings.warmup_events,
            recent_outlier_z=settings.outlier_z,
            max_sources=settings.max_sources,
            enabled=settings.normalize,
            cycle_share=settings.cycle_share if settings.normalize else None,
        )
        # With normalisation: the largest |z| and the stillness follow the z-scores, and
        # each has its own test beside the forest's score (``FittedModel.judge``), with
        # the least threshold it may have. Stillness is strongly autocorrelated (each
        # value averages the last few steps), so its tail fitted on a history of a few
        # thousand rows can be too light: on a fleet of independent noise its threshold
        # came out at 0.50 while later normal events reached 0.64. Under e^-1 of its usual
        # movement in every metric a source is stiller than the simulator's normal events
        # ever were (at most 0.6), and its stuck sources reach 2.1 (median).
        # The recent levels come last, and their relation has a test (``ResidualTest``).
        level = tuple(range(n_features + 2, 2 * n_features + 2))
        self.layout = (
            Layout(
                ((n_features, 0.0), (n_features + 1, _STILLNESS_FLOOR)), (level, _RELATION_FLOOR)
            )
            if settings.normalize
            else NO_TESTS
        )
        width = 2 * n_features + 2 if settings.normalize else n_features
        self.history = History(settings.history_size, width)
        self.schedule = RefitSchedule(
            refit_seconds=settings.refit_seconds,
            refit_events=settings.refit_events,
            min_train=settings.min_train,
        )
        self.model: FittedModel | None = None
        self.versions_fitted = 0
        # In 1/8 of a half-life a source's statistics move about 8% of the way towards
        # its newest values: close enough to judge a round's events against.
        self.events_per_round = max(1, round(settings.halflife_events / 8))

    def prepare(
        self,
        events: Events | Sequence[Event],
        *,
        create_sources: bool = True,
        features: bool = True,
    ) -> Prepared:
        """Arrays and model features of a batch, against the statistics as they stand.

        ``features=False`` leaves the features to ``judge`` or ``learn_unjudged``,
        which compute them round by round anyway: for a backlog batch of hundreds of
        events per source, features of the whole batch at once were thrown away, and
        the temporal columns walk each source's events in order (on a 20,000-event
        batch of 40 sources, 40 of the 170 ms of judging it).
        """
        columns = Events.of(events, self.normalizer.n_features)
        rows = self.normalizer.rows(columns.sources, create=create_sources)
        if not features:
            pending = np.empty((len(rows), 0))
            return Prepared(columns, rows, columns.values, pending, self.normalizer.warmed(rows))
        return self._prepared(columns, rows)

    def _prepared(self, events: Events, rows: IntArray) -> Prepared:
        values = self._input(events, rows)
        return Prepared(
            events=events,
            rows=rows,
            values=values,
            features=self._features(rows, values),
            warmed=self.normalizer.warmed(rows),
        )

    def _input(self, events: Events, rows: IntArray) -> FloatArray:
        """The values the statistics and the model see: a metric with a daily cycle
        less its hour's usual (``consumer.season``), the others as they are."""
        season = self.normalizer.season
        return events.values if season is None else season.residual(rows, events.ts, events.values)

    def score(self, prepared: Prepared, model: FittedModel, *, learn: bool = False) -> Verdict:
        """Score a prepared batch (blocking; read-only unless ``learn``: fine in a
        worker thread).

        A source still warming up is scored but never reported: its statistics say too
        little yet to call anything unusual. With a budget, each event's rate is read
        against its source's own exceedances (``consumer.calibration``): as they stand,
        or, with ``learn``, as they stood at that event, teaching them the batch.
        """
        scores, anomalous, rates = model.judge(prepared.features)
        source_rates = anomaly_rates = rates
        settings = self.settings
        if model.budget is not None and settings.calibration_halflife_events > 0:
            b = model.budget / PER_EVENTS
            # The spans kept: the long run, and the recent events unless turned off.
            spans = [settings.calibration_halflife_events]
            if settings.recent_halflife_events > 0:
                spans.append(settings.recent_halflife_events)
            kept = slice(LONG_RUN, LONG_RUN + len(spans))
            if learn:
                uniq, inverse = np.unique(prepared.rows, return_inverse=True)
                first = np.nan_to_num(self.normalizer.exceedance(uniq)[:, kept], nan=b)
                # The statistics have learned the batch already: its events are not "seen".
                seen = np.maximum(self.normalizer.counts(uniq) - np.bincount(inverse), 0)
                shares, after = walk(
                    inverse, first, seen, rates <= model.budget, prepared.warmed,
                    alpha=1.0 - 0.5 ** (1.0 / np.array(spans)), prior_events=1.0 / b,
                )  # fmt: skip
                self.normalizer.set_exceedance(uniq, after, kept)
            else:
                shares = np.nan_to_num(self.normalizer.exceedance(prepared.rows)[:, kept], nan=b)

            fleet = rates / PER_EVENTS
            source_rates = calibrated(fleet, shares[:, LONG_RUN], b) * PER_EVENTS
            anomaly_rates = calibrated_highest(fleet, shares, b) * PER_EVENTS
        return Verdict(
            scores, anomalous & prepared.warmed, model, rates, source_rates, anomaly_rates
        )

    def judge(self, prepared: Prepared, model: FittedModel) -> tuple[Prepared, Verdict]:
        """Score a batch and let it learn (blocking: the service runs it in its scoring
        thread, and prepares nothing meanwhile). Returns the batch with the features it
        was scored on, and the verdict.

        A batch may hold hundreds of one source's events: a backlog comes one partition
        at a time. Scored all at once against the statistics of the batch's start, the
        later ones would be judged against a past hundreds of events old, and ordinary
        drift would look anomalous. So the batch goes in rounds (``rounds``) of at most
        ``events_per_round`` events per source, each scored against the statistics the
        rounds before it taught.
        """
        # Learning never depends on the scores, so the rounds only learn and fix each
        # event's features; the forest then scores the whole batch in one call (each
        # event's score depends on its features alone). Per round, it took the GIL back
        # once per tree and round (see consumer/forest.py).
        judged = self._learn_in_rounds(prepared)
        return judged, self.score(judged, model, learn=True)

    def _warming(self, prepared: Prepared) -> IntArray:
        """Per event, how many events its source still lacks to be warmed."""
        missing: IntArray = np.maximum(
            self.settings.warmup_events - self.normalizer.counts(prepared.rows), 0
        )
        return missing

    def outliers(self, prepared: Prepared) -> BoolArray:
        """Events far out by a robust, model-free measure: a warmed source's event with a
        z-score beyond ``outlier_z`` in any metric, or a stillness beyond
        ``outlier_stillness``, against the statistics as they stand
        (a batch is learned right after it was prepared, so these are the statistics it
        was prepared against)."""
        z = self.normalizer.zscores(prepared.rows, prepared.values)
        far = np.abs(z).max(axis=1) > self.settings.outlier_z
        if self.settings.normalize:
            assert prepared.features.shape[1], "learn needs features: prepare(features=True)"
            still = self.layout.columns[1][0]
            far |= prepared.features[:, still] > self.settings.outlier_stillness
        out: BoolArray = prepared.warmed & far
        return out

    def learn(self, prepared: Prepared) -> None:
        """Let the batch teach the statistics and the training history.

        What is learned never depends on the verdict, so that what the operator chooses
        to be told (a budget, a fixed threshold) never changes what the detector learns.
        Outliers (``outliers``) count only clipped in their source's statistics, and
        stay out of the history: anomalies that entered it would teach the next forest
        that their region is normal and pull the threshold into their own scores.
        """
        far = self.outliers(prepared)
        self.normalizer.update(prepared.rows, prepared.values, ~far)
        season = self.normalizer.season
        if season is not None:
            events = prepared.events
            started = season.learn(prepared.rows, events.ts, events.values, ~far)
            if len(started):
                # Their input is now the residual, whose spread the profile knows.
                self.normalizer.reseed(started, *season.baseline(started))
        # Only warmed sources' features mean something.
        self.history.add(prepared.features[prepared.warmed & ~far])

    def learn_unjudged(self, prepared: Prepared) -> Prepared:
        """Cold start: learn a batch with no model to judge it by yet, and return it with
        each event's features and warm-up flag as they stood at that event.

        It learns in rounds like ``judge``, with the same outlier rule, so the held
        events are later scored as they would have been live (no hindsight: not against
        statistics that learned from the whole hold), the warm-up guard applies to them,
        and an outlier in the hold teaches neither the statistics nor the history.
        """
        return self._learn_in_rounds(prepared)

    def _learn_in_rounds(self, prepared: Prepared) -> Prepared:
        """Learn a batch in rounds (``rounds``); the batch with each event's features and
        warm-up flag as they stood in its round."""
        parts = rounds(prepared.rows, self.events_per_round, self._warming(prepared))
        if len(parts) == 1:
            if prepared.features.shape[1] == 0:  # prepared with features=False
                prepared = self._prepared(prepared.events, prepared.rows)
            self.learn(prepared)
            return prepared
        values = np.empty_like(prepared.values)
        features = np.empty((len(prepared), self.history.width))
        warmed = np.empty_like(prepared.warmed)
        for idx in parts:
            part = self._prepared(prepared.events.take(idx), prepared.rows[idx])
            self.learn(part)
            values[idx], features[idx], warmed[idx] = part.values, part.features, part.warmed
        return replace(prepared, values=values, features=features, warmed=warmed)

    def cold_start_over(self) -> None:
        """After the first model judged the cold-start batches: refit at once, on the
        history grown while they were held.

        Nothing of the history is judged again: ``learn_unjudged`` already kept the
        outliers out of it, by the same rule as any later batch, and what was reported
        never changes what is learned.
        """
        self.schedule.request()

    def _features(self, rows: IntArray, values: FloatArray) -> FloatArray:
        """What the forest sees: per-source z-scores, the largest of them, the source's
        stillness and its recent levels.

        A forest picks a feature at random for each split, so an event far out in one
        of several features is isolated no faster than one a little out in all of them;
        the extra column puts every such event at the far end of one shared axis. On
        normal data with 4 features and contamination 0.005, this took the recall of
        6-sigma single-feature outliers from 0.11 to 1.0 at the same false-alarm rate
        (max_samples 1024; see the README's "Feature design").

        The temporal columns (``SourceNormalizer.temporal``) show what no single event
        does: stillness a stuck source (the simulator's stuck flatlines went from never
        found to 95-100% of their episodes), the recent levels a metric breaking away
        from those it moves with (correlation breaks from 32-46% of their episodes to
        72-100%; ``scripts/threshold_study.py``, seed 1, at the three anomaly rates).
        """
        z = self.normalizer.transform(rows, values)
        if not self.settings.normalize:
            return z
        still, level = self.normalizer.temporal(rows, values)
        return np.hstack([z, np.abs(z).max(axis=1, keepdims=True), still[:, None], level])

    def fit_due(self, now: float) -> bool:
        return self.schedule.due(now, self.history)

    def training_set(self, now: float) -> tuple[FloatArray, int]:
        """The rows to fit the next model on, and its version; marks the fit as started."""
        self.schedule.started(now, self.history)
        self.versions_fitted += 1
        return self.history.snapshot(), self.versions_fitted

    def install(self, model: FittedModel) -> None:
        """Swap in a newer model; one assignment, so a scorer sees the old or the new."""
        if self.model is None or model.version > self.model.version:
            self.model = model
