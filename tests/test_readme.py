"""The README stays true to the code: every option and every metric is documented."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from consumer.config import ENV_PREFIX, OPTIONS
from consumer.metrics import DetectorMetrics

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_option_is_in_the_configuration_table() -> None:
    missing = [o.flag for o in OPTIONS if f"| `{o.flag}` | `{o.env(ENV_PREFIX)}` |" not in README]
    assert missing == [], f"README's configuration table lacks {missing}"


def test_every_metric_is_in_the_metrics_table() -> None:
    registry = CollectorRegistry()
    DetectorMetrics(registry)
    names = [m.name + ("_total" if m.type == "counter" else "") for m in registry.collect()]
    missing = [n for n in names if f"| `{n}` |" not in README]
    assert missing == [], f"README's metrics table lacks {missing}"
