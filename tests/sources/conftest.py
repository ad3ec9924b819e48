"""Fixtures of the source tests, defined with their helpers in :mod:`tests.sources.dbapps`."""

from tests.sources.dbapps import outputs, pg_url

__all__ = ["outputs", "pg_url"]
