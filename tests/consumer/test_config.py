"""Options: flags, environment variables, defaults, and one clear line for bad values."""

from __future__ import annotations

import pytest

from consumer.config import OPTIONS, load_config
from consumer.pipeline import fit_params


def test_defaults_work_for_a_local_run() -> None:
    config = load_config([], environ={})
    assert config.bootstrap_servers == "localhost:9092"
    assert (config.input_topic, config.output_topic, config.dlq_topic) == (
        "metrics",
        "anomalies",
        "metrics.dlq",
    )
    assert config.group_id == "anomaly-detector"
    assert config.auto_offset_reset == "earliest"
    assert config.window_seconds == 5.0
    assert config.features is None


def test_flag_beats_environment_beats_default() -> None:
    env = {"ANOMALY_WINDOW_SECONDS": "2.5", "ANOMALY_FEATURES": "cpu, mem"}
    config = load_config(["--window-seconds", "1"], environ=env)
    assert config.window_seconds == 1.0
    assert config.features == ("cpu", "mem")
    assert load_config([], environ={"ANOMALY_CONTAMINATION": "auto"}).contamination == "auto"


@pytest.mark.parametrize(
    ("argv", "env", "needle"),
    [
        (["--window-seconds", "0"], {}, "--window-seconds: must be > 0"),
        (["--window-seconds", "soon"], {}, "--window-seconds: must be a number"),
        ([], {"ANOMALY_MAX_BATCH": "-3"}, "--max-batch (from ANOMALY_MAX_BATCH)"),
        (["--contamination", "0.9"], {}, "--contamination: must be <= 0.5"),
        (["--auto-offset-reset", "middle"], {}, "must be one of earliest, latest"),
        (["--features", "cpu,cpu"], {}, "--features: names must not repeat"),
        (["--min-train", "100", "--history-size", "50"], {}, "--min-train (100)"),
        (["--output-topic", "metrics"], {}, "must all differ"),
        # Replay windows of 0.05 x 5 s and 10,000 x 5 s records: neither is 1 to 20,000.
        (["--replay-events-per-second", "0.05"], {}, "--replay-events-per-second (0.05)"),
        (["--replay-events-per-second", "1e4"], {}, "--max-batch (20000) records"),
    ],
)
def test_bad_values_stop_with_one_line_naming_the_option(
    argv: list[str], env: dict[str, str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        load_config(argv, environ=env)
    assert exc.value.code == 2
    message = capsys.readouterr().err
    assert message.startswith("anomaly-detector: error:")
    assert needle in message
    assert message.count("\n") == 1


def test_replay_windows_hold_rate_x_window_records() -> None:
    assert load_config([], environ={}).replay_batch_events == 0  # live
    config = load_config(["--replay-events-per-second", "2000", "--window-seconds", "0.5"], {})
    assert config.replay_batch_events == 1000


def test_every_option_has_a_unique_flag_and_help() -> None:
    flags = [o.flag for o in OPTIONS]
    assert len(flags) == len(set(flags))
    assert all(o.help for o in OPTIONS)


def test_the_false_alarm_budget_reaches_the_fit() -> None:
    config = load_config(["--false-alarm-rate", "3.5"], environ={})
    assert fit_params(config).false_alarm_rate == 3.5
