"""Fixtures of the source tests; the database ones are defined with their helpers in
:mod:`tests.sources.dbapps`."""

from collections.abc import Iterator

import pytest

from asyncsentinel import Sentinel
from tests.sources.dbapps import outputs, pg_url

__all__ = ["outputs", "pg_url", "sentinels"]


@pytest.fixture
def sentinels() -> Iterator[list[Sentinel]]:
    """Sentinels a test made; closed (sources uninstalled) after it."""
    made: list[Sentinel] = []
    yield made
    for sentinel in made:
        sentinel.close()
