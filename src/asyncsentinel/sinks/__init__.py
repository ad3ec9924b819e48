"""Sinks: each knows one backend (Prometheus, OpenTelemetry, logging, memory)."""
