"""The detector's score/learn halves on synthetic fleets."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from consumer.detector import Detector, DetectorSettings, Verdict, rounds
from consumer.events import Event
from consumer.model import FitParams, fit_model
from consumer.normalize import LONG_RUN, RECENT


def fleet_batch(rng: np.random.Generator, n_sources: int, ts: float) -> list[Event]:
    events = []
    for s in range(n_sources):
        scale = 10.0 ** (s % 4)  # baselines four orders of magnitude apart
        values = tuple(scale * (1 + 0.05 * rng.standard_normal(2)))
        events.append(Event(f"s{s}", ts, values, {}))
    return events


def test_outliers_within_a_source_are_found_across_very_different_baselines() -> None:
    rng = np.random.default_rng(0)
    detector = Detector(2, DetectorSettings(min_train=500, warmup_events=10, fit=FitParams(seed=1)))
    for i in range(60):
        batch = detector.prepare(fleet_batch(rng, 40, float(i)))
        detector.learn(batch)
    assert detector.fit_due(100.0)
    training, version = detector.training_set(100.0)
    detector.install(fit_model(training, detector.settings.fit, version=version, fitted_at=0.0,
                                      layout=detector.layout))  # fmt: skip
    assert detector.model is not None

    events = fleet_batch(rng, 40, 200.0)
    # s3 (baseline 1000) at 1300: ordinary for no source but s3 itself, and 6 sigma for it.
    events[3] = Event("s3", 200.0, (1300.0, 1000.0), {})
    verdict = detector.score(detector.prepare(events), detector.model)
    assert verdict.anomalous[3]
    assert verdict.anomalous.sum() <= 3


def test_young_sources_are_scored_but_never_reported() -> None:
    rng = np.random.default_rng(0)
    detector = Detector(2, DetectorSettings(min_train=50, warmup_events=5))
    for i in range(10):
        batch = detector.prepare(fleet_batch(rng, 10, float(i)))
        detector.learn(batch)
    training, version = detector.training_set(0.0)
    detector.install(fit_model(training, detector.settings.fit, version=version, fitted_at=0.0,
                                      layout=detector.layout))  # fmt: skip
    assert detector.model is not None
    verdict = detector.score(
        detector.prepare([Event("brand-new", 0.0, (1e9, 1e9), {})]), detector.model
    )
    assert len(verdict.scores) == 1
    assert not verdict.anomalous[0]


def test_cold_start_learning_fills_the_history_from_a_single_backlog_batch() -> None:
    rng = np.random.default_rng(0)
    detector = Detector(2, DetectorSettings(min_train=100, warmup_events=5))
    backlog = [e for i in range(100) for e in fleet_batch(rng, 10, float(i))]
    held = detector.learn_unjudged(detector.prepare(backlog))
    # Learned in rounds, each source's first one ending with its warm-up: every later
    # event was judged against statistics warmed by the rounds before.
    assert held.warmed.sum() == len(backlog) - 10 * detector.settings.warmup_events
    # All of them but the few far out against 5 events' statistics.
    assert len(detector.history) >= 0.99 * held.warmed.sum()
    assert detector.fit_due(0.0)


def test_outliers_stay_out_of_the_training_history() -> None:
    detector = Detector(1, DetectorSettings(warmup_events=1))
    events = [Event("a", 0.0, (100.0,), {}), Event("a", 0.0, (102.0,), {})]
    detector.learn(detector.prepare(events))
    # 100 standard deviations out, and an ordinary value: only the latter is learned.
    batch = detector.prepare([Event("a", 0.0, (200.0,), {}), Event("a", 0.0, (101.0,), {})])
    assert detector.outliers(batch).tolist() == [True, False]
    detector.learn(batch)
    # The first batch taught the statistics but was judged before any (no warm source).
    assert len(detector.history) == 1


def test_install_never_goes_back_to_an_older_version() -> None:
    detector = Detector(1, DetectorSettings())
    train = np.random.default_rng(0).standard_normal((100, 1))
    newer = fit_model(train, FitParams(), version=2, fitted_at=0.0)
    older = fit_model(train, FitParams(), version=1, fitted_at=0.0)
    detector.install(newer)
    detector.install(older)
    assert detector.model is newer


@pytest.mark.parametrize(
    ("rows", "per_source", "expected"),
    [
        ([], 3, []),  # nothing to judge, no rounds
        ([0, 1, 2, 3], 1, [[0, 1, 2, 3]]),  # every source once: one round, as it came
        ([5, 5, 5], 3, [[0, 1, 2]]),  # exactly per_source of one source still fits
        ([5, 5, 5, 5], 3, [[0, 1, 2], [3]]),  # one more spills into a second round
        # A backlog read one partition at a time: each source's events contiguous.
        ([0, 0, 0, 1, 1, 1], 2, [[0, 1, 3, 4], [2, 5]]),
        # Interleaved sources: each keeps its order, rounds keep the batch's order.
        ([0, 1, 0, 1, 0, 2], 1, [[0, 1, 5], [2, 3], [4]]),
        ([7, 7, 7, 7, 7], 2, [[0, 1], [2, 3], [4]]),  # a last, partial round
    ],
)
def test_rounds(rows: list[int], per_source: int, expected: list[list[int]]) -> None:
    got = rounds(np.array(rows, dtype=np.intp), per_source)
    assert [r.tolist() for r in got] == expected


@pytest.mark.parametrize(
    ("rows", "warming", "expected"),
    [
        # A young source's first round ends where its warm-up does.
        ([0, 0, 0, 0, 0, 0], [2] * 6, [[0, 1], [2, 3, 4], [5]]),
        # Beside a warmed source, which keeps its rounds of per_source.
        ([0, 1, 0, 1, 0, 1, 0, 1], [1, 0] * 4, [[0, 1, 3, 5], [2, 4, 6, 7]]),
        # A warm-up longer than a round: one long first round (it is not judged).
        ([0] * 5, [4] * 5, [[0, 1, 2, 3], [4]]),
    ],
)
def test_rounds_end_a_young_sources_first_round_at_its_warm_up(
    rows: list[int], warming: list[int], expected: list[list[int]]
) -> None:
    got = rounds(np.array(rows, dtype=np.intp), 3, np.array(warming, dtype=np.intp))
    assert [r.tolist() for r in got] == expected


def drifting_backlog(rng: np.random.Generator, n: int) -> list[Event]:
    """One source whose level drifts 8 standard deviations over ``n`` events."""
    level = 100.0 + np.linspace(0.0, 8.0, n) + rng.standard_normal(n)
    return [Event("a", float(i), (float(v),), {}) for i, v in enumerate(level)]


def test_a_backlog_of_one_source_is_judged_against_recent_statistics() -> None:
    rng = np.random.default_rng(3)
    settings = DetectorSettings(warmup_events=5, min_train=100, fit=FitParams(seed=1))
    detector = Detector(1, settings)
    steady = [Event("a", 0.0, (100.0 + float(x),), {}) for x in rng.standard_normal(2_000)]
    for start in range(0, len(steady), 20):
        batch = detector.prepare(steady[start : start + 20])
        detector.learn(batch)
    training, version = detector.training_set(0.0)
    model = fit_model(training, settings.fit, version=version, fitted_at=0.0,
                      layout=detector.layout)  # fmt: skip
    backlog = drifting_backlog(rng, 1_000)

    # The control: the same backlog scored in one piece (scoring alone changes nothing).
    control = detector.score(detector.prepare(backlog), model)
    judged, verdict = detector.judge(detector.prepare(backlog), model)

    # Against the statistics of the backlog's start, its later half looks anomalous;
    # against statistics at most events_per_round old, drift this slow is normal.
    assert control.anomalous.sum() > 300
    assert verdict.anomalous.sum() < 30
    assert list(judged.events) == backlog
    # The features returned are the ones the verdict was scored on.
    np.testing.assert_allclose(model.score(judged.features), verdict.scores)


def fleet_with_outliers(
    rate: float, *, sources: int = 20, per_source: int = 600, seed: int = 0
) -> tuple[list[list[Event]], np.ndarray]:
    """Batches of one event per source and tick (baselines 1 to 1000), and which events
    are outliers: one metric 8 standard deviations off, at ``rate`` after tick 30."""
    rng = np.random.default_rng(seed)
    batches, truth = [], []
    for tick in range(per_source):
        batch, flags = [], []
        for s in range(sources):
            scale = 10.0 ** (s % 4)
            values = scale * (1 + 0.05 * rng.standard_normal(2))
            outlier = tick >= 30 and rng.random() < rate
            if outlier:
                values[rng.integers(2)] += scale * 0.05 * 8.0 * rng.choice([-1.0, 1.0])
            batch.append(Event(f"s{s}", float(tick), tuple(values), {}))
            flags.append(outlier)
        batches.append(batch)
        truth.append(flags)
    return batches, np.array(truth)


FLEET_FIT = FitParams(n_estimators=50, seed=1)


def warm_then_judge(
    detector: Detector, batches: list[list[Event]], warm: int = 300
) -> list[Verdict]:
    """Learn the first ``warm`` batches, fit a model on the history, judge the rest."""
    for batch in batches[:warm]:
        detector.learn(detector.prepare(batch))
    training, version = detector.training_set(0.0)
    model = fit_model(training, FLEET_FIT, version=version, fitted_at=0.0,
                      layout=detector.layout)  # fmt: skip
    return [detector.judge(detector.prepare(batch), model)[1] for batch in batches[warm:]]


def run_fleet(
    rate: float, params: FitParams = FLEET_FIT, seed: int = 0
) -> tuple[Detector, np.ndarray, np.ndarray]:
    """Cold start on the first 150 ticks (held, then scored by the first model, as the
    service does), then every later tick judged; returns the flags and the truth."""
    batches, truth = fleet_with_outliers(rate, seed=seed)
    settings = DetectorSettings(min_train=2_000, warmup_events=20, fit=params)
    detector = Detector(2, settings)
    held = [detector.learn_unjudged(detector.prepare(b)) for b in batches[:150]]
    training, version = detector.training_set(0.0)
    detector.install(fit_model(training, params, version=version, fitted_at=0.0,
                               layout=detector.layout))  # fmt: skip
    assert detector.model is not None
    flagged = [detector.score(p, detector.model).anomalous for p in held]
    for batch in batches[150:]:
        _, verdict = detector.judge(detector.prepare(batch), detector.model)
        flagged.append(verdict.anomalous)
    return detector, np.array(flagged), truth


@pytest.mark.parametrize("rate", [0.002, 0.02, 0.06])
def test_the_flagged_share_follows_the_true_anomaly_rate(rate: float) -> None:
    # A share set by --contamination flagged about 0.2% of events whatever the rate.
    _, flagged, truth = run_fleet(rate)
    assert flagged.mean() == pytest.approx(truth.mean(), rel=0.25)
    assert (flagged & truth).sum() >= 0.9 * truth.sum()
    # About 1.2 expected (1 per 10,000 of ~12,000 normal events); the first model is
    # fitted on 2,000 rows, so its tail is rough.
    assert (flagged & ~truth).sum() <= 6


def test_anomalies_never_pull_the_threshold_into_their_own_scores() -> None:
    detector, _, _ = run_fleet(0.06)
    model = detector.model
    assert model is not None
    outliers = [Event("s3", 0.0, (1000.0 * (1 + 0.05 * 8), 1000.0), {})] * 20
    verdict = detector.score(detector.prepare(outliers, create_sources=False), model)
    assert verdict.anomalous.all()
    # Nothing 8 sd out ever entered the history the forest was fitted on.
    assert detector.history.snapshot()[:, -1].max() <= detector.settings.outlier_z


def test_a_cold_start_batch_with_outliers_does_not_teach_the_statistics_with_them() -> None:
    clean_batches, _ = fleet_with_outliers(0.0, seed=5)
    dirty_batches, truth = fleet_with_outliers(0.03, seed=5)
    clean, dirty = Detector(2), Detector(2)
    # The whole hold in one batch, as a backlog read at start gives it.
    clean.learn_unjudged(clean.prepare([e for b in clean_batches for e in b]))
    held = dirty.learn_unjudged(dirty.prepare([e for b in dirty_batches for e in b]))
    assert truth.sum() > 300
    np.testing.assert_allclose(dirty.normalizer._mean, clean.normalizer._mean, rtol=0.01)
    # Clipped to 3 sd they still count a little; learned as they are, 3% of events 8 sd
    # out would almost triple every variance (1 + 0.03 * 64).
    real = clean.normalizer._count > 0
    ratio = dirty.normalizer._var[real] / clean.normalizer._var[real]
    assert ratio.max() < 1.6
    assert dirty.history.snapshot()[:, dirty.layout.columns[0][0]].max() <= dirty.settings.outlier_z
    # Held events keep the features they had when they came: the outliers stand out.
    assert (held.features[truth.ravel(), dirty.layout.columns[0][0]] > 5.0).mean() > 0.95


def test_what_is_reported_never_changes_what_is_learned() -> None:
    loud, _, _ = run_fleet(0.02, FitParams(n_estimators=50, score_threshold=1e-6, seed=1))
    quiet, _, _ = run_fleet(0.02, FLEET_FIT)
    np.testing.assert_array_equal(loud.history.snapshot(), quiet.history.snapshot())
    np.testing.assert_array_equal(loud.normalizer._var, quiet.normalizer._var)


def test_a_held_batch_keeps_the_features_it_would_have_had_live() -> None:
    batches, _ = fleet_with_outliers(0.02, seed=2)
    events = [e for b in batches[:200] for e in b]
    held, live = Detector(2), Detector(2)
    prepared = held.learn_unjudged(held.prepare(events))
    model = fit_model(np.random.default_rng(0).standard_normal((500, 3)), FitParams(),
                      version=1, fitted_at=0.0)  # fmt: skip
    judged, _ = live.judge(live.prepare(events), model)
    np.testing.assert_array_equal(prepared.features, judged.features)
    np.testing.assert_array_equal(prepared.warmed, judged.warmed)


def test_a_source_stuck_at_a_plausible_value_is_reported() -> None:
    """Every metric at its mean, per event perfectly normal: only stillness shows it
    (the per-event tests alone flag none of these events)."""
    batches, _ = fleet_with_outliers(0.0, seed=6)
    stuck_from, stuck_to = 400, 440
    for tick in range(stuck_from, stuck_to):
        frozen = batches[stuck_from - 1][7]
        batches[tick][7] = Event(frozen.source, float(tick), frozen.values, {})
    settings = DetectorSettings(min_train=2_000, warmup_events=20, fit=FLEET_FIT)
    detector = Detector(2, settings)
    found = np.array([v.anomalous for v in warm_then_judge(detector, batches)])
    assert found[stuck_from - 300 : stuck_to - 300, 7].sum() >= 20
    assert found[:, [s for s in range(20) if s != 7]].sum() <= 3


def test_a_metric_breaking_away_from_its_partner_is_reported() -> None:
    """Two metrics driven by one slowly wandering load; one source's second metric turns
    against it for 30 events, each value within its normal range."""
    rng = np.random.default_rng(8)
    sources, ticks = 20, 700
    load = np.zeros((ticks, sources))
    for t in range(1, ticks):
        load[t] = 0.95 * load[t - 1] + np.sqrt(1 - 0.95**2) * rng.standard_normal(sources)
    noise = 0.3 * rng.standard_normal((ticks, sources, 2))
    values = 100 + 10 * (load[:, :, None] + noise)
    broken = slice(500, 530)
    values[broken, 5, 1] = 200 - values[broken, 5, 1]  # mirrored around the mean, 100
    batches = [
        [Event(f"s{s}", float(t), tuple(values[t, s]), {}) for s in range(sources)]
        for t in range(ticks)
    ]
    settings = DetectorSettings(min_train=2_000, warmup_events=20, fit=FLEET_FIT)
    detector = Detector(2, settings)
    for batch in batches[:400]:
        detector.learn(detector.prepare(batch))
    training, version = detector.training_set(0.0)
    model = fit_model(training, FLEET_FIT, version=version, fitted_at=0.0, layout=detector.layout)
    found = np.array(
        [detector.judge(detector.prepare(b), model)[1].anomalous for b in batches[400:]]
    )
    assert found[100:130, 5].sum() >= 5
    others = np.ones(sources, dtype=bool)
    others[5] = False
    assert found[:, others].sum() <= 3


@pytest.mark.parametrize("per_source", [3, 60])  # one round; several rounds
def test_features_left_to_the_judging_change_nothing(per_source: int) -> None:
    batches, _ = fleet_with_outliers(0.02, per_source=60 + per_source, seed=9)
    eager, lazy = (
        Detector(2, DetectorSettings(fit=FLEET_FIT)),
        Detector(2, DetectorSettings(fit=FLEET_FIT)),
    )
    for detector in (eager, lazy):
        for batch in batches[:60]:
            detector.learn(detector.prepare(batch))
    training, version = eager.training_set(0.0)
    model = fit_model(training, FLEET_FIT, version=version, fitted_at=0.0, layout=eager.layout)
    backlog = [e for b in batches[60:] for e in b]
    a_prepared, a = eager.judge(eager.prepare(backlog), model)
    b_prepared, b = lazy.judge(lazy.prepare(backlog, features=False), model)
    np.testing.assert_array_equal(a_prepared.features, b_prepared.features)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.anomalous, b.anomalous)


def test_a_noisy_source_does_not_outrank_a_quiet_sources_anomaly() -> None:
    """One heavy-tailed source (Student's t, 1.5 degrees of freedom) in a fleet of
    normal ones: fleet-wide it floods, and some of its alarms look rarer than a quiet
    source's 8-sd outlier. Read against its own alarms (``source_rates``), none does."""
    batches, _ = fleet_with_outliers(0.0, seed=6, per_source=900)
    rng = np.random.default_rng(7)
    noisy, quiet, spike_at = 5, 12, 800
    for batch in batches:
        e = batch[noisy]
        values = 10.0 ** (noisy % 4) * (1 + 0.05 * rng.standard_t(1.5, 2))
        batch[noisy] = Event(e.source, e.ts, tuple(values), {})
    e = batches[spike_at][quiet]
    batches[spike_at][quiet] = Event(e.source, e.ts, (10.0 ** (quiet % 4) * 1.4, e.values[1]), {})
    detector = Detector(2, DetectorSettings(min_train=2_000, warmup_events=20, fit=FLEET_FIT))
    verdicts = warm_then_judge(detector, batches)
    flagged = np.array([v.anomalous for v in verdicts])
    fleet = np.array([v.false_alarm_rates for v in verdicts])
    own = np.array([v.source_rates for v in verdicts])
    at = spike_at - 300
    assert flagged[at, quiet]
    floods = flagged[:, noisy]
    assert floods.sum() >= 10
    assert flagged.sum() == floods.sum() + 1  # no other source flagged
    assert (fleet[floods, noisy] < fleet[at, quiet]).any()
    assert (own[floods, noisy] > own[at, quiet]).all()
    # The quiet source's own rate is the fleet's: it had no alarms before.
    assert own[at, quiet] == fleet[at, quiet]


def run_then_lone_outlier(
    settings: DetectorSettings,
) -> tuple[Detector, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A quiet source's run of five 8-sd outliers from tick 600, then one more at 900:
    the detector, and per judged tick (from 300) whether that source was flagged, its
    long-run and its anomaly rates, and where the outliers are."""
    batches, _ = fleet_with_outliers(0.0, seed=3, per_source=1000)
    quiet, outliers = 12, [*range(600, 605), 900]
    for t in outliers:
        e = batches[t][quiet]
        batches[t][quiet] = Event(e.source, e.ts, (10.0 ** (quiet % 4) * 1.4, e.values[1]), {})
    detector = Detector(2, settings)
    verdicts = warm_then_judge(detector, batches)
    flagged = np.array([v.anomalous[quiet] for v in verdicts])
    longrun = np.array([v.source_rates[quiet] for v in verdicts])
    published = np.array([v.anomaly_rates[quiet] for v in verdicts])
    return detector, flagged, longrun, published, np.array(outliers) - 300


RUN_SETTINGS = DetectorSettings(min_train=2_000, warmup_events=20, fit=FLEET_FIT)


def test_a_runs_repeats_rank_below_its_first_anomaly() -> None:
    """The run's first anomaly publishes its long-run rate; the next ones, read against
    the source's recent alarms too, rank below it. By the lone outlier 300 events later
    the recent share has faded, and it publishes its long-run rate again."""
    _, flagged, longrun, published, at = run_then_lone_outlier(RUN_SETTINGS)
    assert flagged[at].all()
    first, repeats, later = at[0], at[1:-1], at[-1]
    assert published[first] == longrun[first]
    assert (published[repeats] > 10 * longrun[repeats]).all()
    assert (published[repeats] > published[first]).all()
    assert published[later] == longrun[later]


def test_without_the_recent_share_anomalies_publish_the_long_run_rate() -> None:
    settings = replace(RUN_SETTINGS, recent_halflife_events=0.0)
    detector, flagged, longrun, published, at = run_then_lone_outlier(settings)
    assert flagged[at].all()
    np.testing.assert_array_equal(published, longrun)
    # Not kept either: the changelog carries none.
    shares = detector.normalizer.exceedance(detector.normalizer.rows(["s12"], create=False))
    assert shares[0, LONG_RUN] > 0
    assert np.isnan(shares[0, RECENT])
