"""The Numenta Anomaly Benchmark (NAB) through the detector: result files, NAB's scorer, pictures.

A NAB-layout corpus (``data/<category>/<file>.csv`` with ``timestamp,value``,
``labels/combined_windows.json``, NAB's ``run.py``) is streamed as a fleet: each file
is one source with one metric, ``value``, and the series are interleaved by row
position (round r holds row r of every series that has one, in the corpus's sorted
order), and replayed (``--replay-events-per-second --rate``): batches of ``--rate`` x
``--window-seconds`` events, as the service's replay windows.

- ``offline``: the batches go through the detector's own pure parts
  (``producer_sim.replay``), with the refit clock advancing one window per batch, and
  the service's incident tracker.
- ``live`` (``producer_sim.nab_live``): the events go through the real service on Kafka.

Both write the same NAB result files (``<category>/<NAME>_<file>.csv`` with
``timestamp,value,anomaly_score,label``; NAME ``published``: the published anomalies'
severities, ``incidents``: the incidents' at their openings, and offline
``forestraw``: every row's forest score) with ``write_results`` and score them with
NAB's own scorer. Service options after ``--`` apply to both modes:

    python -m producer_sim.nab offline --out nab-out -- --seed 1
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from consumer.batch import incident_points
from consumer.calibration import published_rate
from consumer.config import Config, load_config
from consumer.detector import Detector
from consumer.events import Event
from consumer.incidents import OPEN, IncidentTracker
from consumer.model import PER_EVENTS
from consumer.normalize import FloatArray, IntArray
from consumer.pipeline import incident_settings, settings_from
from producer_sim.replay import replay

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_NAB_DIR = ROOT.parent / "shared" / "nab"
PROFILES = ("standard", "reward_low_FP_rate", "reward_low_FN_rate")
PROFILE_HEADERS = ("standard", "low FP", "low FN")
METRIC = "value"
# NAB's scorer splits result file names on "_": a detector name is letters and digits.
RAW_NAME = "forestraw"  # every row's forest score
PUBLISHED_NAME = "published"  # the score where the service published an anomaly, else 0
INCIDENTS_NAME = "incidents"  # the score where an incident opened, else 0
# An opening with no source rate (no calibration) still counts, below any other.
LEAST_SEVERITY = 1e-3


@dataclass(frozen=True)
class Series:
    """One NAB file: its rows as written, as numbers, and its label windows."""

    key: str  # "<category>/<file>.csv", as in NAB's labels
    timestamps: list[str]
    values_text: list[str]
    ts: FloatArray  # epoch seconds (NAB's timestamps are UTC without a zone)
    values: FloatArray
    windows: list[tuple[float, float]]

    @property
    def category(self) -> str:
        return self.key.split("/", 1)[0]

    @property
    def file(self) -> str:
        return self.key.split("/", 1)[1]

    def __len__(self) -> int:
        return len(self.timestamps)

    def labels(self) -> IntArray:
        """1 for the rows inside a label window, else 0."""
        inside = np.zeros(len(self), dtype=np.intp)
        for start, end in self.windows:
            inside[(self.ts >= start) & (self.ts <= end)] = 1
        return inside


def epoch(text: str) -> float:
    return datetime.fromisoformat(text.strip()).replace(tzinfo=UTC).timestamp()


def read_series(key: str, csv_text: str, windows: Sequence[Sequence[str]]) -> Series:
    """A series from its CSV text (``timestamp,value`` with a header) and its windows."""
    lines = [line for line in csv_text.splitlines()[1:] if line.strip()]
    stamps, texts = zip(*(line.split(",", 1) for line in lines), strict=True) if lines else ((), ())
    # A few NAB files repeat a timestamp, so rows are told apart by position, never by ts.
    ts = np.array([epoch(s) for s in stamps])
    return Series(
        key=key,
        timestamps=list(stamps),
        values_text=[t.strip() for t in texts],
        ts=ts,
        values=np.array([float(t) for t in texts]),
        windows=[(epoch(a), epoch(b)) for a, b in windows],
    )


def load_corpus(nab_dir: Path, categories: Sequence[str] = ()) -> list[Series]:
    """Every series under ``data/`` (or in ``categories``), in sorted order."""
    windows = json.loads((nab_dir / "labels" / "combined_windows.json").read_text())
    corpus = []
    for path in sorted((nab_dir / "data").glob("*/*.csv")):
        key = f"{path.parent.name}/{path.name}"
        if categories and path.parent.name not in categories:
            continue
        if key not in windows:
            raise ValueError(f"{key} has no entry in labels/combined_windows.json")
        corpus.append(read_series(key, path.read_text(), windows[key]))
    if not corpus:
        raise ValueError(f"no series under {nab_dir / 'data'}")
    return corpus


def interleave(lengths: Sequence[int]) -> tuple[IntArray, IntArray]:
    """The fleet's order by row position: (series, row) of each event, round r holding
    row r of every series that has one, series in the given order."""
    series = np.concatenate([np.full(n, s, dtype=np.intp) for s, n in enumerate(lengths)])
    rows = np.concatenate([np.arange(n, dtype=np.intp) for n in lengths])
    order = np.lexsort((series, rows))
    return series[order], rows[order]


def event_of(series: Series, row: int) -> Event:
    value = float(series.values[row])
    return Event(series.key, float(series.ts[row]), (value,), {METRIC: value})


def batches(
    corpus: Sequence[Series],
    order: tuple[IntArray, IntArray],
    size: int,
    window_seconds: float,
    event: Callable[[Series, int], Event] = event_of,
) -> Iterator[tuple[float, list[Event]]]:
    """The interleaved events in batches of ``size``; batch b closes at (b + 1) windows."""
    which, rows = order
    for b, lo in enumerate(range(0, len(rows), size)):
        events = [
            event(corpus[s], r)
            for s, r in zip(which[lo : lo + size], rows[lo : lo + size], strict=True)
        ]
        yield (b + 1) * window_seconds, events


@dataclass
class Scores:
    """Per series, each row's raw forest score, what the service published (the
    severity of a flagged row, 0 for any other) and where its incidents opened (the
    incident's severity at the row that opened it, 0 for any other)."""

    raw: dict[str, FloatArray]
    published: dict[str, FloatArray]
    incidents: dict[str, FloatArray]

    @classmethod
    def empty(cls, corpus: Sequence[Series]) -> Scores:
        return cls(
            raw={s.key: np.zeros(len(s)) for s in corpus},
            published={s.key: np.zeros(len(s)) for s in corpus},
            incidents={s.key: np.zeros(len(s)) for s in corpus},
        )

    def of(self, name: str) -> dict[str, FloatArray]:
        """The variant a result-file name stands for."""
        return {RAW_NAME: self.raw, PUBLISHED_NAME: self.published, INCIDENTS_NAME: self.incidents}[
            name
        ]

    def put_incidents(self, corpus: Sequence[Series], records: Iterable[Mapping[str, Any]]) -> int:
        """Each incident's opening (its record with status ``open``) at the row of the
        anomaly that opened it (the source's row at ``last_anomaly_at``), scored with the
        ``severity`` of its ``source_false_alarm_rate``. How many named no row."""
        by_key = {s.key: s for s in corpus}
        unmatched = 0
        for doc in records:
            if doc.get("status") != OPEN:
                continue
            series = by_key.get(str(doc.get("source")))
            at = doc.get("last_anomaly_at")
            row = -1 if series is None or at is None else int(np.searchsorted(series.ts, at))
            if series is None or not 0 <= row < len(series) or series.ts[row] != at:
                unmatched += 1
                continue
            rate = doc.get("source_false_alarm_rate")
            opened = LEAST_SEVERITY if rate is None else severity(float(rate))
            self.incidents[series.key][row] = max(opened, LEAST_SEVERITY)
        return unmatched

    def put(self, key: str, row: int, score: float, published: float) -> None:
        self.raw[key][row] = score
        self.published[key][row] = published


def severity(source_rate: float) -> float:
    """A published anomaly's NAB score: its ``source_false_alarm_rate`` (per 10,000) on a
    log scale, 0 at one per event and 1 at one per 10^8 events or less (the floor of
    ``consumer.calibration`` for the default budget). NAB picks its best single
    threshold over the corpus, so what it needs is a score that ranks alike across
    series: the forest's own saturates, and the fleet-wide rate lets a noisy series'
    floods outrank a quiet one's real anomaly (``consumer.calibration``)."""
    return float(np.clip(np.log10(PER_EVENTS / max(source_rate, 1e-300)) / 8.0, 0.0, 1.0))


def offline(
    corpus: Sequence[Series],
    config: Config,
    event: Callable[[Series, int], Event] = event_of,
    metrics: Sequence[str] = (METRIC,),
    detector: Detector | None = None,
) -> Scores:
    """Every row's scores from the detector's pure parts, batch by batch as the service
    replays them (``--replay-events-per-second``: batches of ``replay_batch_events``, the
    refit clock one window per batch). ``event`` makes a row's event, of ``metrics`` (a
    probe of other inputs: ``scripts/daily_context_probe.py``), judged by ``detector``
    (by default one made from ``config``)."""
    size = config.replay_batch_events
    order = interleave([len(s) for s in corpus])
    if detector is None:
        detector = Detector(len(metrics), settings_from(config))
    incidents = IncidentTracker(incident_settings(config))
    # The z-scores' names, as the service gives them to the incidents (none on raw values).
    names = tuple(metrics) if detector.settings.normalize else None
    scores = Scores.empty(corpus)
    which, rows = order
    # Batches come in stream order (the held ones at the drain, as in the service).
    for judged in replay(
        detector,
        batches(corpus, order, size, config.window_seconds, event),
        max_held_events=config.max_held_events,
    ):
        lo = judged.batch * size
        verdict = judged.verdict
        for i in range(len(judged.prepared)):
            s, r = int(which[lo + i]), int(rows[lo + i])
            published = (
                severity(published_rate(verdict.anomaly_rates[i])) if verdict.anomalous[i] else 0.0
            )
            scores.put(corpus[s].key, r, float(verdict.scores[i]), published)
        points = incident_points(judged.prepared, verdict, names, incidents.watched)
        stream_ts = float(judged.prepared.events.ts.max())
        if scores.put_incidents(corpus, incidents.track(points, stream_ts)):
            raise AssertionError("an incident opened on a row that was not replayed")
    return scores


def join_anomalies(
    corpus: Sequence[Series],
    placed: Mapping[tuple[int, int], tuple[int, int]],
    anomalies: Iterable[Mapping[str, Any]],
) -> tuple[Scores, int]:
    """The published variant from the anomalies topic: each anomaly's ``severity`` at the
    row it came from, found by its input (partition, offset) in ``placed`` (which maps those to
    (series, row) as the events were produced), 0 elsewhere. Returns the scores (the raw
    variant gets the same: the service publishes no other scores) and how many
    anomalies named no produced row."""
    scores = Scores.empty(corpus)
    unmatched = 0
    for doc in anomalies:
        source = doc.get("input")
        where = None
        if isinstance(source, dict):
            where = placed.get((int(source.get("partition", -1)), int(source.get("offset", -1))))
        rate = doc.get("source_false_alarm_rate")
        if where is None or not isinstance(rate, int | float):
            unmatched += 1
            continue
        series, row = where
        published = severity(float(rate))
        scores.put(corpus[series].key, row, published, published)
    return scores, unmatched


def write_results(
    out_dir: Path, name: str, corpus: Sequence[Series], scores: Mapping[str, FloatArray]
) -> None:
    """NAB result files: ``<category>/<name>_<file>.csv``, one row per data row."""
    for series in corpus:
        path = out_dir / series.category / f"{name}_{series.file}"
        path.parent.mkdir(parents=True, exist_ok=True)
        score = np.clip(scores[series.key], 0.0, 1.0)
        labels = series.labels()
        with path.open("w") as f:
            f.write("timestamp,value,anomaly_score,label\n")
            for t, v, a, lab in zip(
                series.timestamps, series.values_text, score, labels, strict=True
            ):
                f.write(f"{t},{v},{a:.6f},{lab}\n")


# -- scoring with NAB's own code ----------------------------------------------------------

_FINAL = re.compile(r"'(\w+)' detector on '(\w+)' profile = (-?[\d.]+)")


class ScoreError(Exception):
    """NAB's scorer failed; the message holds the end of its output."""


def nab_scores(
    nab_dir: Path, name: str, results: Path, python: str, categories: Sequence[str] = ()
) -> dict[str, float]:
    """NAB's final (normalised) score per profile for ``name``'s result files.

    On the whole corpus, the corpus's own ``score`` script when it has one; otherwise,
    and for some ``categories``, what that script does: NAB's ``run.py`` on a copy of
    the data and labels (those categories alone, so the null detector and the
    normalisation are theirs), with its results and thresholds in a temporary folder.
    """
    script = nab_dir / "score"
    # NAB's run.py runs in a temporary folder: a relative python would not be found there.
    python = str(Path(shutil.which(python) or python).absolute())
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    if not categories and script.is_file():
        done = subprocess.run(
            [str(script), name, str(results), python],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        return _parse_final(name, done.stdout + done.stderr, done.returncode)
    with tempfile.TemporaryDirectory(prefix="nab-score-") as tmp:
        work = Path(tmp)
        windows = json.loads((nab_dir / "labels" / "combined_windows.json").read_text())
        keys = sorted(k for k in windows if not categories or k.split("/")[0] in categories)
        for key in keys:
            cat, file = key.split("/", 1)
            (work / "data" / cat).mkdir(parents=True, exist_ok=True)
            shutil.copy(nab_dir / "data" / key, work / "data" / key)
            (work / "results" / name / cat).mkdir(parents=True, exist_ok=True)
            shutil.copy(results / cat / f"{name}_{file}", work / "results" / name / cat)
        (work / "windows.json").write_text(json.dumps({k: windows[k] for k in keys}))
        shutil.copy(nab_dir / "config" / "thresholds.json", work / "thresholds.json")
        common = [
            python, str(nab_dir / "run.py"), "--skipConfirmation", "-n", "1",
            "--dataDir", str(work / "data"), "--resultsDir", str(work / "results"),
            "--windowsFile", str(work / "windows.json"),
            "-p", str(nab_dir / "config" / "profiles.json"), "-t", str(work / "thresholds.json"),
        ]  # fmt: skip
        run = dict(capture_output=True, text=True, env=env, cwd=work, check=False)
        null = subprocess.run([*common, "-d", "null", "--detect"], **run)  # type: ignore[call-overload]
        if null.returncode != 0:
            raise ScoreError(null.stdout[-2000:] + null.stderr[-2000:])
        done = subprocess.run(
            [*common, "-d", f"null,{name}", "--optimize", "--score", "--normalize"], **run
        )  # type: ignore[call-overload]
        return _parse_final(name, done.stdout + done.stderr, done.returncode)


def _parse_final(name: str, output: str, returncode: int) -> dict[str, float]:
    found = {p: float(v) for n, p, v in _FINAL.findall(output) if n == name}
    if returncode != 0 or set(found) != set(PROFILES):
        raise ScoreError(output[-2000:])
    return found


def published_table(nab_dir: Path) -> list[tuple[str, list[float]]]:
    """The published detectors' rows of the corpus README's table(s): any table row whose
    last three cells are numbers (the development subset's table, or NAB's scoreboard)."""
    readme = nab_dir / "README.md"
    rows = []
    for line in readme.read_text().splitlines() if readme.is_file() else []:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) != 4:
            continue
        try:
            numbers = [float(c) for c in cells[1:]]
        except ValueError:
            continue
        rows.append((re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", cells[0]), numbers))
    return rows


def table(rows: Sequence[tuple[str, Sequence[float]]], first: str = "detector") -> str:
    lines = [f"| {first} | " + " | ".join(PROFILE_HEADERS) + " |", "|---|---|---|---|"]
    lines += [f"| {n} | " + " | ".join(f"{v:.1f}" for v in values) + " |" for n, values in rows]
    return "\n".join(lines)


# -- pictures -----------------------------------------------------------------------------


def draw(
    corpus: Sequence[Series], scores: Scores, out_dir: Path, title: str, *, raw_known: bool = True
) -> list[Path]:
    """One PNG per series: values with the label windows shaded, the probationary 15%
    marked, published detections as red dots, incident openings as black triangles;
    below, every row's raw forest score (or, live, where the service publishes no
    other, the published scores)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    paths = []
    for series in corpus:
        when = series.ts.astype("datetime64[s]")
        raw, published = scores.raw[series.key], scores.published[series.key]
        fig, (top, bottom) = plt.subplots(
            2, 1, figsize=(14, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
        )
        top.plot(when, series.values, lw=0.6, color="tab:blue")
        for ax in (top, bottom):
            for start, end in series.windows:
                ax.axvspan(
                    np.datetime64(int(start), "s"),
                    np.datetime64(int(end), "s"),
                    color="tab:orange",
                    alpha=0.25,
                )
            ax.axvline(when[int(0.15 * len(series))], color="grey", ls=":", lw=1)
        hit = published > 0
        top.scatter(
            when[hit],
            series.values[hit],
            color="red",
            s=14,
            zorder=3,
            label=f"published ({hit.sum()})",
        )
        opened = scores.incidents[series.key] > 0
        top.scatter(
            when[opened],
            series.values[opened],
            color="black",
            marker="v",
            s=40,
            zorder=4,
            label=f"incident opened ({opened.sum()})",
        )
        top.legend(loc="upper left", fontsize=8)
        top.set_title(
            f"{series.key}: {title} (orange: label windows, dotted: end of NAB's probation)",
            fontsize=10,
        )
        bottom.plot(when, raw, lw=0.5, color="black")
        bottom.scatter(when[hit], raw[hit], color="red", s=6, zorder=3)
        bottom.set_ylabel("forest score" if raw_known else "published score", fontsize=8)
        bottom.set_ylim(0.3, 1.0)
        bottom.xaxis.set_major_formatter(mdates.DateFormatter("%Y-%m-%d"))  # type: ignore[no-untyped-call,unused-ignore]
        fig.tight_layout()
        path = out_dir / "plots" / series.category / series.file.replace(".csv", ".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths


# -- the command ---------------------------------------------------------------------------


def per_series(
    corpus: Sequence[Series],
    published: Mapping[str, FloatArray],
    incidents: Mapping[str, FloatArray] | None = None,
) -> str:
    """Per series, what the published anomalies did after NAB's probationary 15%: how
    many label windows got at least one, and how many fell outside every window; the
    same for the incidents' openings when given."""
    head = "| series | rows | windows | windows found | anomalies in windows | outside windows |"
    rule = "|---|---|---|---|---|---|"
    if incidents is not None:
        head += " windows found by incidents | incidents outside windows |"
        rule += "---|---|"
    lines = [head, rule]
    for s in corpus:
        found, inside, outside = _hits(s, published[s.key])
        line = f"| {s.key} | {len(s)} | {len(s.windows)} | {found} | {inside} | {outside} |"
        if incidents is not None:
            found, _, outside = _hits(s, incidents[s.key])
            line += f" {found} | {outside} |"
        lines.append(line)
    return "\n".join(lines)


def _hits(s: Series, scores: FloatArray) -> tuple[int, int, int]:
    """After NAB's probation: the windows with a detection, the detections inside
    windows, and those outside every window."""
    flagged = scores > 0
    flagged[: int(0.15 * len(s))] = False
    inside = np.zeros(len(s), dtype=bool)
    found = 0
    for start, end in s.windows:
        window = (s.ts >= start) & (s.ts <= end)
        inside |= window
        found += bool((flagged & window).any())
    return found, int((flagged & inside).sum()), int((flagged & ~inside).sum())


def report(
    corpus: Sequence[Series],
    nab_dir: Path,
    out_dir: Path,
    variants: Mapping[str, tuple[str, Scores]],
    python: str,
    *,
    per_category: bool,
    categories: Sequence[str] = (),
) -> str:
    """Write each variant's result files, score them, and lay out the tables."""
    overall: list[tuple[str, Sequence[float]]] = []
    by_category: list[tuple[str, Sequence[float]]] = []
    for label, (name, scores) in variants.items():
        results = out_dir / "results"
        write_results(results, name, corpus, scores.of(name))
        found = nab_scores(nab_dir, name, results, python, categories)
        overall.append((label, [found[p] for p in PROFILES]))
        if per_category:
            # NAB normalises by the perfect score less the null detector's; on a category
            # with no label window both are 0 and the score is undefined (NaN in NAB).
            with_windows = {s.category for s in corpus if s.windows}
            for category in sorted(with_windows):
                found = nab_scores(nab_dir, name, results, python, [category])
                by_category.append((f"{category}, {label}", [found[p] for p in PROFILES]))
    text = table([*overall, *published_table(nab_dir)])
    if categories:
        text += (
            f"\n\n(this run: {', '.join(categories)} only; the published rows: the whole corpus)"
        )
    if by_category:
        text += "\n\nPer category (NAB's scorer on each category alone):\n\n"
        text += table(by_category, first="category, detector")
        if any(not s.windows for s in corpus):
            text += "\n\n(categories whose series have no label window are not normalisable:"
            text += " see their false alarms below)"
    text += "\n\nPublished anomalies and incidents per series, after NAB's probationary 15%:\n\n"
    scores = next(iter(variants.values()))[1]
    text += per_series(corpus, scores.published, scores.incidents)
    return text


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """A bad option: one line naming it, status 2."""
        self.exit(2, f"{self.prog}: {message}\n")


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    service_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, service_args = argv[:cut], argv[cut + 1 :]
    parser = _Parser(
        prog="python -m producer_sim.nab",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("mode", choices=("offline", "live", "backlog"),
                        help="offline: the detector's pure parts; live: the service running "
                        "first, events paced at --rate; backlog: every event in the topic "
                        "before the service starts")  # fmt: skip
    parser.add_argument(
        "--nab-dir", type=Path, default=Path(os.environ.get("NAB_DIR", DEFAULT_NAB_DIR))
    )
    parser.add_argument("--out", type=Path, default=Path("nab-out"), help="output folder")
    parser.add_argument("--rate", type=float, default=2000.0, help="events per second (live); "
                        "offline, a batch holds rate x --window-seconds events")  # fmt: skip
    parser.add_argument("--category", action="append", default=[], help="only these categories")
    parser.add_argument("--python", default=sys.executable, help="python for NAB's scorer")
    parser.add_argument("--no-score", action="store_true", help="write result files only")
    parser.add_argument(
        "--no-per-category", action="store_true", help="score the whole corpus only"
    )
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--partitions", type=int, default=4, help="input partitions (live)")
    args = parser.parse_args(argv)
    if args.rate <= 0:
        parser.error("--rate must be > 0")
    return args, service_args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args, service_args = parse_args(argv)
    # The service's options are checked here in every mode (a bad one: one line, status 2).
    # The evaluation replays history: the same option live and offline (a later one in
    # the service's options wins).
    service_args = ["--replay-events-per-second", f"{args.rate:g}", *service_args]
    config = load_config(service_args, environ={})
    if not config.replay_events_per_second:
        print("nab: the evaluation replays history: --replay-events-per-second must be > 0",
              file=sys.stderr)  # fmt: skip
        return 2
    nab_dir: Path = args.nab_dir.resolve()
    try:
        corpus = load_corpus(nab_dir, args.category)
    except (OSError, ValueError) as exc:
        print(f"nab: cannot read the corpus at {nab_dir}: {exc}", file=sys.stderr)
        return 2
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    events = sum(len(s) for s in corpus)
    print(f"{len(corpus)} series, {events} rows from {nab_dir}; mode {args.mode}", end="")
    print(f", rate {args.rate:g}/s")
    started = time.perf_counter()
    if args.mode == "offline":
        scores = offline(corpus, config)
        variants = {
            "this detector, offline: raw forest score": (RAW_NAME, scores),
            "this detector, offline: published (source-rate severity, 0 unless flagged)": (
                PUBLISHED_NAME,
                scores,
            ),
            "this detector, offline: incidents (severity where one opened)": (
                INCIDENTS_NAME,
                scores,
            ),
        }
    else:
        from producer_sim.nab_live import LiveError, run_live

        try:
            scores = run_live(corpus, args, service_args, out_dir)
        except LiveError as exc:
            print(f"nab: {exc}", file=sys.stderr)
            return 1
        paced = f" at {args.rate:g}/s" if args.mode == "live" else ""
        variants = {
            f"this service, {args.mode}{paced}: published": (PUBLISHED_NAME, scores),
            f"this service, {args.mode}{paced}: incidents": (INCIDENTS_NAME, scores),
        }
    print(f"detection took {time.perf_counter() - started:.1f} s")
    if not args.no_plots:
        title = f"{args.mode}, published anomalies"
        paths = draw(corpus, scores, out_dir, title, raw_known=args.mode == "offline")
        print(f"{len(paths)} pictures under {out_dir / 'plots'}")
    if args.no_score:
        for _, (name, chosen) in variants.items():
            write_results(
                out_dir / "results",
                name,
                corpus,
                chosen.of(name),
            )
        print(f"result files under {out_dir / 'results'}")
        return 0
    try:
        text = report(
            corpus,
            nab_dir,
            out_dir,
            variants,
            args.python,
            per_category=not args.no_per_category,
            categories=args.category,
        )
    except ScoreError as exc:
        print(f"nab: NAB's scorer failed:\n{exc}", file=sys.stderr)
        return 1
    (out_dir / "scores.md").write_text(text + "\n")
    print(text)
    print(f"total {time.perf_counter() - started:.1f} s; tables in {out_dir / 'scores.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
