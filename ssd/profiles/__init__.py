"""Acceptance profiles shipped with ssd (written by `python -m ssd.benchmark.record_profile`)."""
