"""Streaming anomaly detector for Kafka metric events."""
