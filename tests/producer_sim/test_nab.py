"""The NAB evaluation's pure parts on small hand-made tables: reading, interleaving,
result files, joining anomalies back to rows, the replay's cold start."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from consumer.config import load_config
from consumer.detector import Detector, DetectorSettings
from consumer.events import Event
from producer_sim.nab import (
    INCIDENTS_NAME,
    LEAST_SEVERITY,
    PUBLISHED_NAME,
    Scores,
    Series,
    interleave,
    join_anomalies,
    load_corpus,
    main,
    offline,
    per_series,
    published_table,
    read_series,
    severity,
    write_results,
)
from producer_sim.replay import replay

CSV_A = "timestamp,value\n2015-01-01 00:00:00,1.5\n2015-01-01 00:05:00,2\n2015-01-01 00:10:00,3e2\n"
CSV_B = "timestamp,value\n2014-06-01 12:00:00,7\n2014-06-01 12:00:00,8\n"


def corpus() -> list[Series]:
    return [
        read_series(
            "cat/a.csv", CSV_A, [["2015-01-01 00:05:00.000000", "2015-01-01 00:10:00.000000"]]
        ),
        read_series("dog/b.csv", CSV_B, []),
    ]


def test_a_series_keeps_its_rows_as_written_and_its_labels() -> None:
    a, b = corpus()
    assert (a.category, a.file, len(a)) == ("cat", "a.csv", 3)
    assert a.timestamps == ["2015-01-01 00:00:00", "2015-01-01 00:05:00", "2015-01-01 00:10:00"]
    assert a.values_text == ["1.5", "2", "3e2"]
    assert a.values.tolist() == [1.5, 2.0, 300.0]
    # 2015-01-01T00:00:00Z; NAB's timestamps carry no zone and are read as UTC.
    assert a.ts[0] == 1420070400.0
    # A window includes both of its ends.
    assert a.labels().tolist() == [0, 1, 1]
    # A repeated timestamp (as in NAB's exchange-2_cpc_results) keeps both rows.
    assert b.values.tolist() == [7.0, 8.0]
    assert b.labels().tolist() == [0, 0]


@pytest.mark.parametrize(
    ("lengths", "series", "rows"),
    [
        ([3, 2], [0, 1, 0, 1, 0], [0, 0, 1, 1, 2]),
        ([1, 3, 2], [0, 1, 2, 1, 2, 1], [0, 0, 0, 1, 1, 2]),
        ([2], [0, 0], [0, 1]),
        ([0, 2], [1, 1], [0, 1]),
    ],
)
def test_interleaving_goes_by_row_position(
    lengths: list[int], series: list[int], rows: list[int]
) -> None:
    got_series, got_rows = interleave(lengths)
    assert got_series.tolist() == series
    assert got_rows.tolist() == rows


def test_result_files_have_one_row_per_data_row_in_nab_s_columns(tmp_path: Path) -> None:
    a, b = corpus()
    scores = {a.key: np.array([0.25, 1.7, -0.1]), b.key: np.array([0.0, 0.5])}
    write_results(tmp_path, "det", [a, b], scores)
    assert (tmp_path / "cat" / "det_a.csv").read_text().splitlines() == [
        "timestamp,value,anomaly_score,label",
        "2015-01-01 00:00:00,1.5,0.250000,0",
        # Scores are clipped into NAB's [0, 1].
        "2015-01-01 00:05:00,2,1.000000,1",
        "2015-01-01 00:10:00,3e2,0.000000,1",
    ]
    assert (tmp_path / "dog" / "det_b.csv").read_text().splitlines()[1:] == [
        "2014-06-01 12:00:00,7,0.000000,0",
        "2014-06-01 12:00:00,8,0.500000,0",
    ]


def test_anomalies_join_back_to_their_rows_by_input_partition_and_offset() -> None:
    a, b = corpus()
    # Where each (series, row) landed when produced.
    placed = {(0, 0): (0, 0), (0, 1): (1, 0), (1, 0): (0, 1), (1, 1): (1, 1), (0, 2): (0, 2)}
    anomalies = [
        {
            "source": b.key,
            "ts": float(b.ts[1]),
            "score": 0.9,
            "source_false_alarm_rate": 1e-4,
            "input": {"partition": 1, "offset": 1},
        },
        {
            "source": a.key,
            "ts": float(a.ts[2]),
            "score": 0.8,
            "source_false_alarm_rate": 1.0,
            "input": {"partition": 0, "offset": 2},
        },
        # Not produced by this run, and one with no input: counted, not placed.
        {"source": a.key, "source_false_alarm_rate": 0.5, "input": {"partition": 3, "offset": 0}},
        {"source": a.key, "source_false_alarm_rate": 0.5},
    ]
    scores, unmatched = join_anomalies([a, b], placed, anomalies)
    assert unmatched == 2
    # The severity: the source's rate per 10,000 on a log scale, 1 at 10^-8 per event.
    assert scores.published[a.key].tolist() == [0.0, 0.0, 0.5]
    # Same timestamp as row 0: only the offset tells the second row.
    assert scores.published[b.key].tolist() == [0.0, 1.0]


def test_incidents_score_where_they_opened_at_their_source_rate_s_severity() -> None:
    a, b = corpus()
    scores = Scores.empty([a, b])
    records = [
        # Opened by the anomaly at row 1 (its first one was row 0): scored at row 1.
        {"source": a.key, "status": "open", "started_at": float(a.ts[0]),
         "last_anomaly_at": float(a.ts[1]), "source_false_alarm_rate": 1.0},
        # Updates and resolutions are not detections.
        {"source": a.key, "status": "update", "last_anomaly_at": float(a.ts[2]),
         "source_false_alarm_rate": 1e-4},
        # No source rate: still a detection, below every other.
        {"source": b.key, "status": "open", "last_anomaly_at": float(b.ts[0]),
         "source_false_alarm_rate": None},
        # Not a row of the corpus: counted.
        {"source": a.key, "status": "open", "last_anomaly_at": float(a.ts[1]) + 1.0},
        {"source": "cat/c.csv", "status": "open", "last_anomaly_at": float(a.ts[1])},
    ]  # fmt: skip
    assert scores.put_incidents([a, b], records) == 2
    assert scores.incidents[a.key].tolist() == [0.0, 0.5, 0.0]
    assert scores.incidents[b.key].tolist() == [LEAST_SEVERITY, 0.0]
    assert scores.of(INCIDENTS_NAME) is scores.incidents


@pytest.mark.parametrize(
    ("rate", "expected"),
    [(1e4, 0.0), (1.0, 0.5), (0.01, 0.75), (1e-4, 1.0), (0.0, 1.0), (3e4, 0.0)],
)
def test_severity_reads_the_source_rate_on_a_log_scale(rate: float, expected: float) -> None:
    assert severity(rate) == pytest.approx(expected)


def test_published_table_reads_the_corpus_readme_rows(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text(
        "| detector | standard | low FP | low FN |\n|---|---|---|---|\n"
        "| Numenta HTM | 71.2 | 65.0 | 75.9 |\n"
        "| [Random Cut Forest](http://x) | 52.0 | 38.3 | 61.0 |\n"
        "| a | b | c |\n"
    )
    assert published_table(tmp_path) == [
        ("Numenta HTM", [71.2, 65.0, 75.9]),
        ("Random Cut Forest", [52.0, 38.3, 61.0]),
    ]


def write_corpus(root: Path, n_series: int, rows: int, seed: int) -> None:
    """A small NAB-layout corpus: noisy series, each with one spike inside a window."""
    rng = np.random.default_rng(seed)
    windows = {}
    for s in range(n_series):
        values = 10.0 * (s + 1) + rng.standard_normal(rows)
        values[rows - 50] += 40.0
        stamps = [
            np.datetime64("2014-01-01T00:00") + np.timedelta64(5 * i, "m") for i in range(rows)
        ]
        text = "\n".join(
            f"{str(t).replace('T', ' ')}:00,{v:.4f}" for t, v in zip(stamps, values, strict=True)
        )
        key = f"cat{s % 2}/s{s}.csv"
        (root / "data" / key).parent.mkdir(parents=True, exist_ok=True)
        (root / "data" / key).write_text("timestamp,value\n" + text + "\n")
        w = [
            str(stamps[rows - 55]).replace("T", " ") + ":00",
            str(stamps[rows - 40]).replace("T", " ") + ":00",
        ]
        windows[key] = [w]
    (root / "labels").mkdir()
    (root / "labels" / "combined_windows.json").write_text(json.dumps(windows))


def test_offline_scores_every_row_and_flags_the_spikes(tmp_path: Path) -> None:
    write_corpus(tmp_path, n_series=4, rows=1500, seed=3)
    series = load_corpus(tmp_path)
    config = load_config(
        ["--replay-events-per-second", "100", "--min-train", "500", "--refit-seconds", "10"],
        environ={},
    )
    scores = offline(series, config)
    for s in series:
        raw, published = scores.raw[s.key], scores.published[s.key]
        # Every row judged (cold-start rows too, once the first model exists).
        assert (raw > 0).all()
        assert (raw <= 1).all()
        # A published anomaly's severity (``severity``), 0 for any other row.
        assert ((published >= 0) & (published <= 1)).all()
        assert published[len(s) - 50] > 0, s.key
    write_results(tmp_path / "out", PUBLISHED_NAME, series, scores.published)
    files = sorted(p.name for p in (tmp_path / "out").rglob("*.csv"))
    assert files == [f"{PUBLISHED_NAME}_s{i}.csv" for i in range(4)]


@pytest.mark.parametrize(("hold", "first_judged"), [(True, 0), (False, 2)])
def test_replay_judges_the_cold_start_batches_only_when_holding(
    hold: bool, first_judged: int
) -> None:
    # Two sources, 20 events each a batch: batch 0 warms both up (20 events), batch 1,
    # learnt unjudged against warmed statistics, gives the history its 40 rows, so the
    # first fit follows it. With the hold both are judged by that model; without, never.
    rng = np.random.default_rng(5)
    batches = [
        (
            float(b + 1),
            [Event(f"s{i % 2}", float(b * 40 + i), (float(rng.normal()),), {}) for i in range(40)],
        )
        for b in range(4)
    ]
    settings = DetectorSettings(min_train=40, warmup_events=20, refit_seconds=100.0)
    judged = list(replay(Detector(1, settings), batches, hold_cold_start=hold))
    assert [j.batch for j in judged] == list(range(first_judged, 4))
    assert all(len(j.verdict.scores) == 40 for j in judged)


def test_per_series_counts_windows_found_and_anomalies_outside_after_probation() -> None:
    rows = 20
    csv = "timestamp,value\n" + "".join(f"2015-01-01 {h:02d}:00:00,1\n" for h in range(rows))
    windows = [
        ["2015-01-01 05:00:00", "2015-01-01 07:00:00"],
        ["2015-01-01 12:00:00", "2015-01-01 13:00:00"],
    ]
    series = read_series("cat/a.csv", csv, windows)
    published = np.zeros(rows)
    # Row 1 is in the probationary 15% (rows 0-2): not counted. Rows 5 and 6 hit the first
    # window; rows 9 and 19 are outside; the second window is missed.
    published[[1, 5, 6, 9, 19]] = 0.9
    assert per_series([series], {series.key: published}).splitlines()[2] == (
        "| cat/a.csv | 20 | 2 | 1 | 2 | 2 |"
    )
    # Incidents opened at rows 5, 12 and 15: both windows, one opening outside.
    opened = np.zeros(rows)
    opened[[5, 12, 15]] = 0.5
    assert per_series([series], {series.key: published}, {series.key: opened}).splitlines()[2] == (
        "| cat/a.csv | 20 | 2 | 1 | 2 | 2 | 2 | 1 |"
    )


def test_the_command_writes_every_offline_variant(tmp_path: Path) -> None:
    write_corpus(tmp_path, n_series=2, rows=1200, seed=4)
    out = tmp_path / "out"
    argv = ["offline", "--nab-dir", str(tmp_path), "--out", str(out), "--no-score", "--no-plots"]
    assert main([*argv, "--", "--min-train", "500"]) == 0
    written = sorted(str(p.relative_to(out / "results")) for p in out.rglob("*.csv"))
    assert written == [
        "cat0/forestraw_s0.csv", "cat0/incidents_s0.csv", "cat0/published_s0.csv",
        "cat1/forestraw_s1.csv", "cat1/incidents_s1.csv", "cat1/published_s1.csv",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["offlin"], "invalid choice: 'offlin'"),
        (["offline", "--rate", "0"], "--rate must be > 0"),
        (["offline", "--", "--seed", "x"], "--seed"),
    ],
)
def test_a_bad_option_stops_with_one_line_naming_it(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert message in err
