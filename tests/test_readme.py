"""The README documents every setting and every finding kind (and stays in step with the code)."""

from __future__ import annotations

from pathlib import Path

import pytest

from asyncsentinel import ALL_KINDS
from asyncsentinel.config import ENV_PREFIX, Settings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


@pytest.mark.parametrize("name", Settings.names())
def test_every_setting_is_documented(name: str) -> None:
    assert f"| `{name}` | `{ENV_PREFIX}{name.upper()}` |" in README


@pytest.mark.parametrize("kind", sorted(ALL_KINDS))
def test_every_finding_kind_is_documented(kind: str) -> None:
    assert f"| `{kind}` |" in README


def test_readme_names_the_two_setup_commands() -> None:
    assert "make demo" in README
    assert "make test" in README
