"""Culprit attribution: library frames are skipped, the application's own lines are kept."""

from __future__ import annotations

import os
import sysconfig

import pytest

from asyncsentinel.frames import Location, is_user_code, user_culprit

SITE = os.path.join(sysconfig.get_paths()["purelib"], "")


@pytest.mark.parametrize(
    "library",
    [
        "requests/sessions.py",
        "urllib3/connectionpool.py",
        "sqlalchemy/engine/base.py",
        "starlette/routing.py",
        "uvicorn/server.py",
        "asyncpg/pool.py",
        "aiohttp/client.py",
    ],
)
def test_library_frames_are_never_the_culprit(library: str) -> None:
    assert not is_user_code(SITE + library)


def test_the_innermost_application_frame_is_the_culprit() -> None:
    stack = (
        Location("/srv/app/routes.py", 10, "handler"),
        Location("/srv/app/services.py", 42, "fetch_prices"),
        Location(SITE + "requests/api.py", 73, "get"),
        Location(SITE + "urllib3/connectionpool.py", 715, "urlopen"),
        Location(os.path.join(sysconfig.get_paths()["stdlib"], "socket.py"), 706, "readinto"),
    )
    assert user_culprit(stack) == Location("/srv/app/services.py", 42, "fetch_prices")
