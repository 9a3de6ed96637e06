"""Options of both subcommands: flags, SIM_* variables, and one-line refusals."""

from __future__ import annotations

import pytest

from producer_sim.cli import amain, parse_evaluate, parse_run
from producer_sim.generator import KINDS

NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["run", "--rate", "fast"], "--rate"),
        (["run", "--rate", "-1"], "--rate"),
        (["--count", "1.5"], "--count"),  # run is the default subcommand
        (["run", "--kinds", "spike,bogus"], "--kinds"),
        (["run", "--metrics-per-source", "7"], "--metrics-per-source"),
        (["run", "--progress", "maybe"], "--progress"),
        (["run", "--kinds", "correlation_break", "--metrics-per-source", "1"], "--kinds"),
        (["evaluate", "--timeout-seconds", "0"], "--timeout-seconds"),
    ],
)
async def test_a_bad_value_exits_2_with_one_line_naming_the_option(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        await amain(argv, environ={})
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert named in err
    assert err.startswith("producer-sim ")


async def test_a_bad_environment_value_names_the_variable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exc:
        await amain(["run"], environ={"SIM_SOURCES": "0"})
    assert exc.value.code == 2
    assert "--sources (from SIM_SOURCES)" in capsys.readouterr().err


def test_environment_variables_set_options_and_flags_win() -> None:
    environ = {
        "SIM_BOOTSTRAP_SERVERS": "kafka:29092",
        "SIM_TOPIC": "from-env",
        "SIM_RATE": "250",
        "SIM_KINDS": "spike,flatline",
        "SIM_SEED": "9",
        "SIM_PROGRESS": "false",
    }
    config = parse_run(["--topic", "from-flag"], environ, now=NOW)
    assert config.bootstrap_servers == "kafka:29092"
    assert config.topic == "from-flag"
    assert config.rate_per_second == 250.0
    assert config.sim.rate_per_second == 250.0
    assert config.sim.kinds == ("spike", "flatline")
    assert config.sim.seed == 9
    assert config.progress is False


def test_run_defaults() -> None:
    config = parse_run(["--progress", "true"], {}, now=NOW)
    assert (config.bootstrap_servers, config.topic) == ("localhost:9092", "metrics")
    assert config.rate_per_second == 1000.0
    assert (config.count, config.duration_seconds, config.metrics_port) == (0, 0.0, 0)
    assert config.progress is True
    sim = config.sim
    assert (sim.sources, sim.metrics_per_source, sim.anomaly_rate) == (50, 4, 0.0005)
    assert sim.kinds == KINDS
    assert sim.day_seconds == 600.0
    assert sim.start_ts == NOW


def test_prefilling_as_fast_as_possible_ends_about_now() -> None:
    """With --rate 0 the events are spaced at 1000/s, and the last one is about now."""
    config = parse_run(["--rate", "0", "--count", "5000"], {}, now=NOW)
    assert config.rate_per_second == 0.0
    assert config.sim.rate_per_second == 1000.0
    assert config.sim.start_ts == NOW - 5.0


def test_evaluate_options() -> None:
    config, json_path = parse_evaluate(
        ["--json", "-", "--anomalies-topic", "found"], {"SIM_INPUT_TOPIC": "metrics-x"}
    )
    assert json_path == "-"
    assert (config.input_topic, config.anomalies_topic) == ("metrics-x", "found")
    assert config.timeout_seconds == 30.0
    default, no_json = parse_evaluate([], {})
    assert no_json is None
    assert (default.input_topic, default.anomalies_topic) == ("metrics", "anomalies")


async def test_evaluate_refuses_one_topic_for_both(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        await amain(["evaluate", "--anomalies-topic", "metrics"], environ={})
    assert exc.value.code == 2
    assert "--anomalies-topic" in capsys.readouterr().err
