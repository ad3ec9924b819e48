"""Settings: kwargs and ASYNCSENTINEL_* variables, validated at start-up with clear errors."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncsentinel import ConfigError, Sentinel
from asyncsentinel.config import Settings


def test_defaults_are_valid() -> None:
    settings = Settings.load({}, environ={})
    assert settings.metrics_path == "/metrics"
    assert settings.n_plus_one_threshold == 5
    assert settings.loop_block_seconds == pytest.approx(0.1)


def test_environment_is_read_and_kwargs_win() -> None:
    environ = {
        "ASYNCSENTINEL_SLOW_QUERY_SECONDS": "0.25",
        "ASYNCSENTINEL_N_PLUS_ONE_THRESHOLD": "7",
        "ASYNCSENTINEL_LOOP_MONITOR": "off",
        "ASYNCSENTINEL_METRICS_PATH": "off",
        "ASYNCSENTINEL_IGNORE_KINDS": "slow_query, n_plus_one",
    }
    settings = Settings.load({"n_plus_one_threshold": 3}, environ=environ)
    assert settings.slow_query_seconds == pytest.approx(0.25)
    assert settings.n_plus_one_threshold == 3  # the keyword argument wins
    assert settings.loop_monitor is False
    assert settings.metrics_path is None
    assert settings.ignore_kinds == frozenset({"slow_query", "n_plus_one"})


@pytest.mark.parametrize(
    ("environ", "fragments"),
    [
        ({"ASYNCSENTINEL_SLOW_QUERY_SECONDS": "fast"}, ["slow_query_seconds", "seconds > 0"]),
        ({"ASYNCSENTINEL_SLOW_QUERY_SECONDS": "-1"}, ["slow_query_seconds", "'-1'"]),
        ({"ASYNCSENTINEL_LOOP_MONITOR": "maybe"}, ["loop_monitor", "true or false"]),
        ({"ASYNCSENTINEL_N_PLUS_ONE_THRESHOLD": "1"}, ["n_plus_one_threshold", "integer >= 2"]),
        ({"ASYNCSENTINEL_METRICS_PATH": "metrics"}, ["metrics_path", "starting with '/'"]),
        ({"ASYNCSENTINEL_SLOW_QUERY_SECOND": "1"}, ["unknown setting", "slow_query_seconds"]),
    ],
)
def test_bad_environment_fails_naming_setting_and_accepted_values(
    environ: dict[str, str], fragments: list[str]
) -> None:
    with pytest.raises(ConfigError) as excinfo:
        Settings.load({}, environ=environ)
    for fragment in fragments:
        assert fragment in str(excinfo.value)


def test_unrelated_prefixed_variables_are_ignored() -> None:
    # The test-suite's own variable shares the prefix and is no setting.
    Settings.load({}, environ={"ASYNCSENTINEL_TEST_DATABASE_URL": "postgresql://x"})


@pytest.mark.parametrize(
    ("options", "fragments"),
    [
        ({"slow_query_secs": 1}, ["unknown setting", "Did you mean 'slow_query_seconds'"]),
        ({"slow_query_seconds": "1"}, ["slow_query_seconds", "ASYNCSENTINEL_SLOW_QUERY_SECONDS"]),
        ({"loop_block_seconds": 0.0001}, ["loop_block_seconds", "0.005 to 60"]),
        ({"max_routes": True}, ["max_routes"]),
        ({"ignore_kinds": ["nope"]}, ["unknown finding kind", "nope", "n_plus_one"]),
        ({"slow_query_seconds": float("nan")}, ["slow_query_seconds"]),
    ],
)
def test_bad_keyword_fails_fast_at_construction(
    options: dict[str, object], fragments: list[str]
) -> None:
    with pytest.raises(ConfigError) as excinfo:
        Sentinel(**options)  # type: ignore[arg-type]
    for fragment in fragments:
        assert fragment in str(excinfo.value)


@given(st.floats(min_value=1e-6, max_value=1e6, allow_nan=False))
def test_any_positive_seconds_round_trips_through_the_environment(value: float) -> None:
    settings = Settings.load({}, environ={"ASYNCSENTINEL_SLOW_QUERY_SECONDS": repr(value)})
    assert settings.slow_query_seconds == value


@given(
    st.text(min_size=1).filter(
        lambda t: t.strip().lower() not in {"1", "0", "true", "false", "yes", "no", "on", "off"}
    )
)
def test_any_non_boolean_text_is_rejected_for_a_switch(text: str) -> None:
    with pytest.raises(ConfigError, match="loop_monitor"):
        Settings.load({}, environ={"ASYNCSENTINEL_LOOP_MONITOR": text})


def test_replace_validates() -> None:
    settings = Settings.load({}, environ={})
    assert settings.replace(max_routes=10).max_routes == 10
    with pytest.raises(ConfigError, match="max_routes"):
        settings.replace(max_routes=0)
