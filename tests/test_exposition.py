"""Multiprocess exposition: `uvicorn --workers N` reports the totals of all workers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support import free_port

ROOT = Path(__file__).resolve().parent.parent


def scrape_total(base: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        if family.name == "http_server_request_duration_seconds":
            return sum(
                s.value
                for s in family.samples
                if s.name.endswith("_count") and s.labels.get("http_route") == "/pid"
            )
    return 0.0


def test_uvicorn_workers_report_totals_of_all_workers(tmp_path: Path) -> None:
    port = free_port()
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path), PYTHONPATH=str(ROOT))
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "tests.apps.multiproc_app:app",
            "--workers",
            "2",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{base}/metrics", timeout=2)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.2)
        pids: set[int] = set()
        sent = 0
        while sent < 300 and (len(pids) < 2 or sent < 40):
            pids.add(httpx.get(f"{base}/pid", timeout=10).json())  # a new connection each time
            sent += 1
        assert len(pids) == 2, "both workers should have served requests"
        # Whichever worker answers the scrape, it reports what every worker counted.
        for _ in range(6):
            assert scrape_total(base) == sent
    finally:
        server.terminate()
        server.wait(timeout=30)
