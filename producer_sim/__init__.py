"""Simulated metric streams with labelled anomalies, to feed and score the detector."""
