"""The ``asyncsentinel demo`` command: the example shop under uvicorn, traffic, a findings report.

The shop itself lives in ``examples/shop`` in the source repository; the wheel ships it as
``asyncsentinel.demo.shop``. :func:`load_shop` finds whichever is there.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

DEMO_REQUIREMENTS = ("fastapi", "uvicorn", "aiosqlite", "httpx")
"""Modules the demo needs beyond asyncsentinel's own dependencies (the ``demo`` extra)."""


class DemoError(Exception):
    """The demo cannot run; the message says why and what to do."""


def missing_requirements() -> list[str]:
    """The demo's required modules that are not installed."""
    return [name for name in DEMO_REQUIREMENTS if importlib.util.find_spec(name) is None]


def load_shop() -> ModuleType:
    """Import the example shop's ``app`` module (``create_app``, ``release_deliberate_leaks``)."""
    missing = missing_requirements()
    if missing:
        raise DemoError(
            f"the demo needs {', '.join(missing)}: install them with "
            f"pip install 'asyncsentinel[demo]'"
        )
    if importlib.util.find_spec("asyncsentinel.demo.shop") is not None:  # installed from a wheel
        return importlib.import_module("asyncsentinel.demo.shop.app")
    # A source checkout (editable install): src/asyncsentinel/demo -> <repo>/examples/shop.
    examples = Path(__file__).resolve().parents[3] / "examples"
    if not (examples / "shop" / "app.py").is_file():
        raise DemoError(
            "the example shop is not installed: reinstall asyncsentinel from a wheel or run the "
            "demo from a clone of the repository"
        )
    if str(examples) not in sys.path:
        sys.path.insert(0, str(examples))
    return importlib.import_module("shop.app")
