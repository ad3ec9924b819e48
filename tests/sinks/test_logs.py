"""Log records: kind, route and culprit file:line in the message; repeated findings rate-limited."""

from __future__ import annotations

import logging
import time

import pytest

from asyncsentinel.findings import N_PLUS_ONE, Finding, Severity
from asyncsentinel.frames import current_stack, user_culprit
from asyncsentinel.sinks.logs import LogSink


def make_finding(message: str = "SELECT x executed 12 times") -> Finding:
    stack = current_stack(skip=1)
    return Finding.create(
        N_PLUS_ONE,
        message,
        culprit=user_culprit(stack),
        stack=stack,
        evidence={"count": 12},
        request=None,
    )


def test_record_names_kind_route_culprit_and_stack(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="asyncsentinel")
    finding = make_finding()
    LogSink(rate_limit_seconds=60).emit(finding)
    (record,) = caplog.records
    text = record.getMessage()
    assert record.levelno == logging.WARNING
    assert text.startswith("asyncsentinel n_plus_one on outside a request at ")
    assert f"{__file__}:{finding.culprit.lineno} in " in text  # type: ignore[union-attr]
    assert "Stack (most recent call last):" in text
    assert "    finding = make_finding()" in text  # source lines are shown
    assert record.asyncsentinel["kind"] == "n_plus_one"  # type: ignore[attr-defined]
    assert record.asyncsentinel["evidence"] == {"count": 12}  # type: ignore[attr-defined]


def test_identical_findings_are_rate_limited_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="asyncsentinel")
    sink = LogSink(rate_limit_seconds=0.2)
    finding = make_finding()
    for _ in range(5):
        sink.emit(finding)
    assert len(caplog.records) == 1
    sink.emit(make_finding("another place, another finding"))  # a different culprit line
    assert len(caplog.records) == 2
    time.sleep(0.25)
    sink.emit(finding)
    assert len(caplog.records) == 3
    assert "4 identical findings were not logged" in caplog.records[-1].getMessage()


def test_info_findings_log_at_info(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="asyncsentinel")
    LogSink().emit(
        Finding.create(
            "db_configuration_advice", "pool_pre_ping is off", severity=Severity.INFO, request=None
        )
    )
    assert caplog.records[0].levelno == logging.INFO
