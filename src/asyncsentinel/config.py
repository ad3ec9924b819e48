"""One settings object: keyword arguments plus ``ASYNCSENTINEL_*`` environment variables.

Every threshold of every detector lives here, is validated once at start-up, and a wrong value
fails fast with a :class:`ConfigError` that names the setting and what it accepts.
Keyword arguments win over the environment.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

ENV_PREFIX = "ASYNCSENTINEL_"

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class ConfigError(ValueError):
    """A setting has a value asyncsentinel cannot use; the message names it and what is accepted."""


@dataclass(frozen=True, slots=True)
class _Rule:
    """How one setting is parsed from text and checked."""

    accepted: str
    minimum: float | None = None
    maximum: float | None = None
    allow_none: bool = False


def _rule(accepted: str, **kwargs: Any) -> dict[str, Any]:
    return {"rule": _Rule(accepted, **kwargs)}


@dataclass(frozen=True, slots=True)
class Settings:
    """Validated configuration of one :class:`~asyncsentinel.Sentinel`.

    Build it with :meth:`Settings.load`, which reads ``ASYNCSENTINEL_<NAME>`` environment
    variables and applies keyword overrides.
    """

    # --- exposition and sinks -------------------------------------------------------------
    metrics_path: str | None = field(
        default="/metrics",
        metadata=_rule(
            "a URL path starting with '/', or 'off' to serve no metrics endpoint", allow_none=True
        ),
    )
    server_span: bool = field(
        default=False,
        metadata=_rule(
            "true or false: create the OpenTelemetry server span when no "
            "OpenTelemetry ASGI instrumentation does"
        ),
    )
    log_findings: bool = field(default=True, metadata=_rule("true or false"))
    log_rate_limit_seconds: float = field(
        default=60.0,
        metadata=_rule("seconds >= 0 between two log records of one finding", minimum=0.0),
    )
    recent_findings: int = field(
        default=1000, metadata=_rule("an integer from 1 to 1000000", minimum=1, maximum=1_000_000)
    )
    ignore_kinds: frozenset[str] = field(
        default=frozenset(), metadata=_rule("a comma-separated list of finding kinds")
    )
    max_routes: int = field(
        default=200,
        metadata=_rule(
            "an integer from 1 to 100000 (distinct http_route values)", minimum=1, maximum=100_000
        ),
    )
    max_label_sets: int = field(
        default=2000,
        metadata=_rule(
            "an integer from 10 to 1000000 (label combinations per metric)",
            minimum=10,
            maximum=1_000_000,
        ),
    )
    # --- database ------------------------------------------------------------------------
    sqlalchemy: bool = field(default=True, metadata=_rule("true or false"))
    n_plus_one_threshold: int = field(
        default=5,
        metadata=_rule(
            "an integer >= 2 (executions of one statement shape per request)",
            minimum=2,
            maximum=1_000_000,
        ),
    )
    slow_query_seconds: float = field(default=0.5, metadata=_rule("seconds > 0", minimum=1e-6))
    pool_wait_seconds: float = field(
        default=0.1,
        metadata=_rule("seconds > 0 a checkout may wait before pool_exhausted", minimum=1e-6),
    )
    connection_leak_seconds: float = field(
        default=5.0, metadata=_rule("seconds > 0 after the request ends", minimum=1e-3)
    )
    # --- event loop and tasks --------------------------------------------------------------
    loop_monitor: bool = field(default=True, metadata=_rule("true or false"))
    loop_block_seconds: float = field(
        default=0.1, metadata=_rule("seconds from 0.005 to 60", minimum=0.005, maximum=60.0)
    )
    loop_heartbeat_seconds: float = field(
        default=0.025, metadata=_rule("seconds from 0.001 to 10", minimum=0.001, maximum=10.0)
    )
    task_tracking: bool = field(default=True, metadata=_rule("true or false"))
    task_leak_seconds: float = field(
        default=5.0, metadata=_rule("seconds > 0 after the response finished", minimum=1e-3)
    )
    thread_pool_metrics: bool = field(default=True, metadata=_rule("true or false"))
    # --- HTTP client ---------------------------------------------------------------------
    aiohttp: bool = field(default=True, metadata=_rule("true or false"))

    @classmethod
    def names(cls) -> list[str]:
        """All setting names, in declaration order."""
        return [f.name for f in fields(cls)]

    @classmethod
    def load(
        cls, overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
    ) -> Settings:
        """Read ``ASYNCSENTINEL_*`` variables from *environ*, apply *overrides*, validate all."""
        environ = os.environ if environ is None else environ
        overrides = dict(overrides or {})
        known = {f.name: f for f in fields(cls)}
        for name in overrides:
            if name not in known:
                raise ConfigError(_unknown_message(name, f"{name}=", known))
        values: dict[str, Any] = {}
        for key, text in environ.items():
            if not key.startswith(ENV_PREFIX):
                continue
            name = key[len(ENV_PREFIX) :].lower()
            if name not in known:
                # Variables of other asyncsentinel tools (e.g. the test database URL) share the
                # prefix; only complain about ones that look like a mistyped setting.
                if difflib.get_close_matches(name, known, n=1, cutoff=0.8):
                    raise ConfigError(_unknown_message(name, key, known))
                continue
            if name not in overrides:
                values[name] = _parse(known[name], text, source=key)
        for name, value in overrides.items():
            values[name] = _check(known[name], value, source=f"{name}=")
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        """A copy with *changes* applied and validated."""
        known = {f.name: f for f in fields(self)}
        for name in changes:
            if name not in known:
                raise ConfigError(_unknown_message(name, f"{name}=", known))
        checked = {n: _check(known[n], v, source=f"{n}=") for n, v in changes.items()}
        return dataclasses.replace(self, **checked)


def _unknown_message(name: str, source: str, known: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return (
        f"asyncsentinel: unknown setting {source!r}.{hint} "
        f"Accepted settings: {', '.join(sorted(known))}."
    )


def _error(f: dataclasses.Field[Any], source: str, value: object) -> ConfigError:
    rule: _Rule = f.metadata["rule"]
    env = ENV_PREFIX + f.name.upper()
    origin = (
        f"from environment variable {env}"
        if source == env
        else f"from keyword argument {f.name}=; also settable as {env}"
    )
    return ConfigError(
        f"asyncsentinel: invalid value {value!r} for setting {f.name!r} ({origin}): "
        f"expected {rule.accepted}."
    )


def _parse(f: dataclasses.Field[Any], text: str, *, source: str) -> Any:
    """Turn the text of an environment variable into a value of the setting's type."""
    rule: _Rule = f.metadata["rule"]
    stripped = text.strip()
    if rule.allow_none and stripped.lower() in {"", "off", "none", "false", "0"}:
        return None
    default = f.default
    value: Any
    try:
        if isinstance(default, bool):
            lowered = stripped.lower()
            if lowered not in _TRUE | _FALSE:
                raise ValueError
            value = lowered in _TRUE
        elif isinstance(default, int):
            value = int(stripped)
        elif isinstance(default, float):
            value = float(stripped)
        elif isinstance(default, frozenset):
            value = frozenset(p.strip() for p in stripped.split(",") if p.strip())
        else:
            value = stripped
        return _check(f, value, source=source)
    except ValueError:  # ConfigError too: report the text as the user wrote it
        raise _error(f, source, text) from None


def _check(f: dataclasses.Field[Any], value: Any, *, source: str) -> Any:
    """Validate a value of the setting's type against its rule; return the normalised value."""
    rule: _Rule = f.metadata["rule"]
    default = f.default
    if value is None:
        if rule.allow_none:
            return None
        raise _error(f, source, value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise _error(f, source, value)
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _error(f, source, value)
    elif isinstance(default, float):
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise _error(f, source, value)
        value = float(value)
    elif isinstance(default, frozenset):
        if isinstance(value, str) or not all(isinstance(v, str) for v in value):
            raise _error(f, source, value)
        value = frozenset(value)
        if f.name == "ignore_kinds":
            from asyncsentinel.findings import ALL_KINDS

            unknown = sorted(value - ALL_KINDS)
            if unknown:
                raise ConfigError(
                    f"asyncsentinel: unknown finding kind(s) {', '.join(unknown)} in setting "
                    f"'ignore_kinds' (from {source}): accepted kinds are "
                    f"{', '.join(sorted(ALL_KINDS))}."
                )
        return value
    elif isinstance(default, str) or default is None:
        if not isinstance(value, str):
            raise _error(f, source, value)
        if f.name == "metrics_path" and not value.startswith("/"):
            raise _error(f, source, value)
        return value
    if rule.minimum is not None and value < rule.minimum:
        raise _error(f, source, value)
    if rule.maximum is not None and value > rule.maximum:
        raise _error(f, source, value)
    return value
