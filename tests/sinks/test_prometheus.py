"""Prometheus: bounded label sets, and a real scrape that passes `promtool check metrics`."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

import asyncsentinel
from asyncsentinel import Sentinel
from asyncsentinel.instruments import FINDINGS
from asyncsentinel.sinks.prometheus import OVERFLOW_LABEL, PrometheusSink
from tests.support import sample, serve


def test_label_sets_are_capped_per_metric(registry: CollectorRegistry) -> None:
    sink = PrometheusSink(registry, max_label_sets=10)
    for i in range(50):
        sink.record(FINDINGS, 1, ("n_plus_one", f"/route/{i}"))
    series = [
        s
        for m in registry.collect()
        if m.name == "asyncsentinel_findings"
        for s in m.samples
        if s.name == "asyncsentinel_findings_total"
    ]
    assert len(series) == 11
    assert (
        sample(
            registry, "asyncsentinel_findings_total", kind=OVERFLOW_LABEL, http_route=OVERFLOW_LABEL
        )
        == 40
    )
    assert sum(s.value for s in series) == 50  # nothing is lost, only folded


def test_two_sentinels_share_one_registry(
    make_sentinel: Callable[..., Sentinel], registry: CollectorRegistry
) -> None:
    first, second = make_sentinel(), make_sentinel()
    assert first.registry is second.registry is registry


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing: CI must install Debian's 'prometheus' package")
        pytest.skip("promtool not installed: apt-get install prometheus")
    return path


def test_real_scrape_passes_promtool_check_metrics(
    registry: CollectorRegistry, tracer_provider: object
) -> None:
    tool = promtool()
    app = FastAPI()

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    sentinel = asyncsentinel.instrument(app, registry=registry, tracer_provider=tracer_provider)
    try:
        with serve(app) as base:
            for i in range(3):
                httpx.get(f"{base}/items/{i}")
            httpx.get(f"{base}/missing")
            scrape = httpx.get(f"{base}/metrics").text
    finally:
        sentinel.close()
    assert "http_server_request_duration_seconds_bucket" in scrape
    result = subprocess.run(
        [tool, "check", "metrics"], input=scrape, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stderr
