"""The batch-fed histogram must read exactly like prometheus-client's own."""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, Histogram

from consumer.metrics import BatchHistogram


def test_batch_histogram_matches_a_histogram_fed_one_by_one() -> None:
    buckets = (0.3, 0.5, 0.7)
    # Values on the bucket edges belong to that bucket (le: less or equal).
    values = np.array([0.1, 0.3, 0.30001, 0.5, 0.69, 0.7, 0.71, 5.0])
    batch_registry, plain_registry = CollectorRegistry(), CollectorRegistry()
    batch = BatchHistogram("h", "help", buckets, batch_registry)
    plain = Histogram("h", "help", buckets=buckets, registry=plain_registry)
    batch.observe_many(values[:3])
    batch.observe_many(values[3:])
    for v in values:
        plain.observe(float(v))
    for le in ("0.3", "0.5", "0.7", "+Inf"):
        expected = plain_registry.get_sample_value("h_bucket", {"le": le})
        assert batch_registry.get_sample_value("h_bucket", {"le": le}) == expected
    assert batch_registry.get_sample_value("h_count") == len(values)
    assert batch_registry.get_sample_value("h_sum") == plain_registry.get_sample_value("h_sum")
