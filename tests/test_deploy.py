"""Checks of the deployment files that need no broker and no Docker daemon.

The compose file, the Prometheus config and the Grafana dashboard all name things
the code defines (options, ports, topics, metric series). Nothing fails loudly when
they drift apart: an unknown ``ANOMALY_*`` variable is ignored, a misspelled series
draws an empty panel. These tests tie each name back to its definition.

``docker-compose`` and ``promtool`` come from ``scripts/install-test-tools``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from consumer.config import ENV_PREFIX as DETECTOR_PREFIX
from consumer.config import OPTIONS as DETECTOR_OPTIONS
from consumer.config import load_config
from consumer.metrics import DetectorMetrics
from consumer.options import Option
from producer_sim.cli import ENV_PREFIX as SIM_PREFIX
from producer_sim.cli import RUN_OPTIONS as SIM_OPTIONS
from producer_sim.cli import parse_run
from producer_sim.generator import KINDS
from producer_sim.run import SimMetrics

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DATASOURCES = ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "anomaly-detector.json"

# Compose service names, as Prometheus reaches them on the compose network.
DETECTOR_SERVICE = "detector"
SIM_SERVICE = "simulator"
TOPICS_SERVICE = "topics"

# Each panel the dashboard must have, and what its queries must contain to be that
# panel (a title alone could sit over any query).
REQUIRED_PANELS: dict[str, tuple[str, ...]] = {
    "Events consumed and scored /s": (
        "rate(anomaly_detector_events_consumed_total",
        "rate(anomaly_detector_events_scored_total",
    ),
    "Anomalies /s": ("rate(anomaly_detector_anomalies_published_total",),
    "Invalid events /s by reason": (
        "by (reason)",
        "rate(anomaly_detector_events_invalid_total",
    ),
    "Anomaly score distribution": ("anomaly_detector_anomaly_score_bucket",),
    "Consumer lag per partition": ("partition", "anomaly_detector_consumer_lag_records"),
    "End-to-end latency p50/p95/p99": (
        "histogram_quantile(0.5,",
        "histogram_quantile(0.95,",
        "histogram_quantile(0.99,",
        "anomaly_detector_end_to_end_latency_seconds_bucket",
    ),
    "Model age": ("time() - anomaly_detector_model_last_fit_timestamp_seconds",),
    "Model fit duration": ("anomaly_detector_model_fit_duration_seconds_bucket",),
    "Model version": ("anomaly_detector_model_version",),
    "Event-loop lag p99": (
        "histogram_quantile(0.99,",
        "anomaly_detector_event_loop_lag_seconds_bucket",
    ),
    "Errors /s": ("rate(anomaly_detector_errors_total",),
}

# A series name of ours in a PromQL expression; the lookbehind keeps it from matching
# the tail of a longer name.
SERIES_NAME = re.compile(r"(?<![A-Za-z0-9_:])(?:anomaly_detector|producer_sim)_[a-z0-9_]+")

# Series a metric family exposes when it has no sample to show them (a labelled
# metric before its first child): what prometheus_client would name them.
SUFFIXES_BY_TYPE: dict[str, tuple[str, ...]] = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
    "stateset": ("",),
}

# Grafana's own variables, replaced by what they expand to so promtool can parse.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$instance": ".*"}
# A templating query is Grafana's label_values(<series selector>, <label>).
LABEL_VALUES = re.compile(r"^\s*label_values\((?P<selector>.+),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*$")


def tool(name: str) -> str:
    """The tool's path; a missing tool fails (never skips) with the fix."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not on PATH: run scripts/install-test-tools", pytrace=False)
    return path


def run_tool(argv: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool(argv[0]), *argv[1:]],
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose file as docker-compose resolves it: anchors merged, variables set."""
    done = run_tool(["docker-compose", "-f", str(COMPOSE), "config"])
    assert done.returncode == 0, done.stderr
    resolved: dict[str, Any] = yaml.safe_load(done.stdout)
    return resolved


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    with DASHBOARD.open(encoding="utf-8") as f:
        loaded: dict[str, Any] = json.load(f)
    return loaded


def service(compose: Mapping[str, Any], name: str) -> dict[str, Any]:
    services: dict[str, dict[str, Any]] = compose["services"]
    assert name in services, f"no service {name!r} in {COMPOSE.name}: {sorted(services)}"
    return services[name]


def environment(compose: Mapping[str, Any], name: str) -> dict[str, str]:
    env: dict[str, str] = service(compose, name).get("environment") or {}
    missing = sorted(key for key, value in env.items() if value is None)
    assert not missing, f"{name}: variables without a value: {missing}"
    return env


def panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, also those inside collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def queries(dashboard: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and every templating query."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            if target.get("expr"):
                yield f"panel {panel['title']!r} target {target.get('refId')}", target["expr"]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        text = query.get("query") if isinstance(query, dict) else query
        if text:
            yield f"variable {variable['name']!r}", text


def exported_series(registry: CollectorRegistry) -> set[str]:
    """The series names a registry exposes, as a scrape shows them."""
    names: set[str] = set()
    for family in registry.collect():
        if family.samples:
            names.update(sample.name for sample in family.samples)
        else:
            assert family.type in SUFFIXES_BY_TYPE, f"{family.name}: type {family.type}"
            names.update(family.name + suffix for suffix in SUFFIXES_BY_TYPE[family.type])
    return names


# --- the files are valid for their own tools


def test_compose_file_is_valid() -> None:
    done = run_tool(["docker-compose", "-f", str(COMPOSE), "config", "-q"])
    assert done.returncode == 0, f"docker-compose config -q failed:\n{done.stderr}"


def test_prometheus_config_is_valid() -> None:
    done = run_tool(["promtool", "check", "config", str(PROMETHEUS_CONFIG)])
    assert done.returncode == 0, f"promtool check config failed:\n{done.stdout}{done.stderr}"


def test_every_dashboard_query_parses_as_promql(dashboard: dict[str, Any], tmp_path: Path) -> None:
    """Each query, as a recording rule, through promtool's PromQL parser."""
    rules = []
    where = {}
    for i, (origin, query) in enumerate(queries(dashboard)):
        grafana_function = LABEL_VALUES.match(query)
        expr = grafana_function["selector"] if grafana_function else query
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"{origin}: a Grafana variable this test does not know: {expr}"
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
        where[f"dashboard:query_{i}"] = origin
    assert len(rules) >= len(REQUIRED_PANELS)
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = run_tool(["promtool", "check", "rules", str(path)])
    rejected = sorted(set(re.findall(r"dashboard:query_\d+", done.stdout + done.stderr)))
    assert done.returncode == 0, (
        "promtool rejected dashboard queries: "
        + "; ".join(where[record] for record in rejected if record in where)
        + f"\n{done.stdout}{done.stderr}"
    )


# --- the compose file configures the programs through their own options


def check_environment(
    env: Mapping[str, str], prefix: str, options: Sequence[Option], what: str
) -> list[str]:
    """Problems with the ``prefix`` variables of ``env``: unknown names, refused values."""
    by_name = {opt.env(prefix): opt for opt in options}
    problems = []
    for name, value in sorted(env.items()):
        if not name.startswith(prefix):
            continue
        opt = by_name.get(name)
        if opt is None:
            problems.append(f"{name}: not an option of {what}")
            continue
        try:
            opt.parse(value)
        except ValueError as exc:
            problems.append(f"{name}={value!r}: refused by {opt.flag}: {exc}")
    return problems


def test_detector_is_configured_only_by_its_own_variables(compose: dict[str, Any]) -> None:
    detector = service(compose, DETECTOR_SERVICE)
    env = environment(compose, DETECTOR_SERVICE)
    problems = check_environment(env, DETECTOR_PREFIX, DETECTOR_OPTIONS, "consumer.config")
    problems += [
        f"{name}: the detector reads no SIM_* variable"
        for name in env
        if name.startswith(SIM_PREFIX)
    ]
    assert not problems, "\n".join(problems)
    assert "command" not in detector, "the detector takes its settings from ANOMALY_* only"
    assert detector.get("entrypoint") is None, "the detector runs the image's entrypoint"
    # Together, too: the cross-option checks of Config hold (a SystemExit otherwise).
    ours = {k: v for k, v in env.items() if k.startswith(DETECTOR_PREFIX)}
    config = load_config([], environ=ours)
    assert config.metrics_host == "0.0.0.0", "reachable from the Prometheus container"


def test_simulator_is_configured_only_by_its_own_variables(compose: dict[str, Any]) -> None:
    simulator = service(compose, SIM_SERVICE)
    env = environment(compose, SIM_SERVICE)
    problems = check_environment(env, SIM_PREFIX, SIM_OPTIONS, "producer_sim.cli (run)")
    problems += [
        f"{name}: the simulator reads no ANOMALY_* variable"
        for name in env
        if name.startswith(DETECTOR_PREFIX)
    ]
    assert not problems, "\n".join(problems)
    assert simulator.get("entrypoint") == ["producer-sim"]
    assert simulator.get("command") == ["run"], "options come from SIM_* only"
    ours = {k: v for k, v in env.items() if k.startswith(SIM_PREFIX)}
    run = parse_run([], environ=ours)
    assert run.metrics_port > 0, "SIM_METRICS_PORT must be set: Prometheus scrapes it"


def test_check_environment_reports_unknown_names_and_bad_values() -> None:
    """The check above can fail: a typo and a refused value are both reported."""
    problems = check_environment(
        {"ANOMALY_WINDOW_SECOND": "5", "ANOMALY_MAX_BATCH": "0", "PATH": "/bin"},
        DETECTOR_PREFIX,
        DETECTOR_OPTIONS,
        "consumer.config",
    )
    assert len(problems) == 2
    assert problems[0].startswith("ANOMALY_MAX_BATCH='0': refused by --max-batch")
    assert problems[1] == "ANOMALY_WINDOW_SECOND: not an option of consumer.config"


def test_topics_service_creates_the_topics_the_programs_use(compose: dict[str, Any]) -> None:
    detector = load_config([], environ=environment(compose, DETECTOR_SERVICE))
    simulator = parse_run([], environ=environment(compose, SIM_SERVICE))
    command = service(compose, TOPICS_SERVICE)["command"]
    created = {arg for arg in command if not arg.startswith("-")}
    wanted = {detector.input_topic, detector.output_topic, detector.dlq_topic}
    assert wanted <= created, f"the topics service does not create {sorted(wanted - created)}"
    assert simulator.topic == detector.input_topic, "the simulator feeds the detector's input"


def test_prometheus_scrapes_the_ports_the_programs_serve(compose: dict[str, Any]) -> None:
    detector = load_config([], environ=environment(compose, DETECTOR_SERVICE))
    simulator = parse_run([], environ=environment(compose, SIM_SERVICE))
    config = load_yaml(PROMETHEUS_CONFIG)
    targets = {
        target
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    }
    expected = {
        f"{DETECTOR_SERVICE}:{detector.metrics_port}",
        f"{SIM_SERVICE}:{simulator.metrics_port}",
    }
    assert expected <= targets, f"not scraped: {sorted(expected - targets)}"


# --- the dashboard asks for series that exist


def test_dashboard_uses_only_exported_series(dashboard: dict[str, Any]) -> None:
    registry = CollectorRegistry()
    DetectorMetrics(registry)
    SimMetrics(registry, KINDS)
    exported = exported_series(registry)
    used: dict[str, set[str]] = {}
    for origin, expr in queries(dashboard):
        for name in SERIES_NAME.findall(expr):
            used.setdefault(name, set()).add(origin)
    assert any(n.startswith("anomaly_detector_") for n in used), "no detector series used"
    assert any(n.startswith("producer_sim_") for n in used), "no simulator series used"
    unknown = {name: origins for name, origins in used.items() if name not in exported}
    assert not unknown, "series the dashboard queries but nothing exports:\n" + "\n".join(
        f"  {name} (in {', '.join(sorted(origins))})" for name, origins in sorted(unknown.items())
    )


def test_exported_series_names_what_a_scrape_shows() -> None:
    """Histograms are queried by _bucket/_sum/_count and counters by _total, never by
    their family name; labelled metrics count before their first child exists."""
    registry = CollectorRegistry()
    DetectorMetrics(registry)
    exported = exported_series(registry)
    assert "anomaly_detector_events_consumed_total" in exported
    assert "anomaly_detector_events_consumed" not in exported
    assert "anomaly_detector_anomaly_score_bucket" in exported
    assert "anomaly_detector_anomaly_score" not in exported
    assert "anomaly_detector_consumer_lag_records" in exported  # labelled, no child yet
    assert "anomaly_detector_model_version" in exported
    assert SERIES_NAME.findall(
        'rate(anomaly_detector_errors_total{kind="commit"}[1m]) / x_anomaly_detector_y'
    ) == ["anomaly_detector_errors_total"]


def test_dashboard_has_the_panels_operators_need(dashboard: dict[str, Any]) -> None:
    by_title = {panel["title"]: panel for panel in panels(dashboard)}
    missing = sorted(set(REQUIRED_PANELS) - set(by_title))
    assert not missing, f"panels missing from {DASHBOARD.name}: {missing}"
    for title, fragments in REQUIRED_PANELS.items():
        exprs = " ".join(t.get("expr", "") for t in by_title[title].get("targets", []))
        absent = [fragment for fragment in fragments if fragment not in exprs]
        assert not absent, f"panel {title!r}: its queries lack {absent}"
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_dashboard_uses_the_provisioned_datasource(dashboard: dict[str, Any]) -> None:
    (datasource,) = load_yaml(DATASOURCES)["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    wrong = sorted(
        panel["title"]
        for panel in panels(dashboard)
        if panel.get("type") != "row"
        and (panel.get("datasource") or {}).get("uid") != datasource["uid"]
    )
    assert not wrong, f"panels not on datasource uid {datasource['uid']!r}: {wrong}"
