"""Culprit locations: which line of the user's code caused a finding.

Frames are walked only when a finding fires (never on the hot path). "User code" is any file
that is not part of the standard library, asyncsentinel itself, or the frameworks and drivers
it instruments; the demo shop shipped inside the package counts as user code.

Where a place must be remembered before anyone knows whether a finding will need it (a
connection checked out, a session created), it is kept as an :data:`Origin` — the code object
and instruction offset — and made a :class:`Location` only when a finding is reported.
"""

from __future__ import annotations

import linecache
import os
import sys
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from types import CodeType, FrameType

# Distributions whose frames are never the culprit: the stack passes through them on its way
# from the user's code to the database, the network or the event loop.
_LIBRARY_PACKAGES = (
    "aiohttp",
    "aiosignal",
    "aiosqlite",
    "anyio",
    "asyncpg",
    "fastapi",
    "greenlet",
    "gunicorn",
    "h11",
    "httpcore",
    "httptools",
    "httpx",
    "hypercorn",
    "multidict",
    "opentelemetry",
    "prometheus_client",
    "psycopg",
    "psycopg2",
    "pydantic",
    "pydantic_core",
    "sniffio",
    "sqlalchemy",
    "starlette",
    "uvicorn",
    "uvloop",
    "watchfiles",
    "websockets",
    "yarl",
    "requests",
    "urllib3",
    "charset_normalizer",
    "idna",
    "certifi",
    "botocore",
    "boto3",
    "redis",
    "psycopg_pool",
    "pymysql",
    "aiomysql",
    "motor",
    "pymongo",
    "_pytest",
    "pluggy",
    "pytest_asyncio",
)

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
PACKAGE_PREFIX = _PACKAGE_DIR + os.sep
"""How the path of every file of asyncsentinel itself begins (its frames are never culprits)."""
# Only the shop itself: the demo's runner beside it (asyncsentinel/demo/*.py) wraps every request
# of the shop and must not become a culprit.
_DEMO_DIR = os.path.join(_PACKAGE_DIR, "demo", "shop") + os.sep


@dataclass(frozen=True, slots=True)
class Location:
    """A place in source code: ``file:line in function``."""

    filename: str
    lineno: int
    function: str

    def __str__(self) -> str:
        return f"{self.filename}:{self.lineno} in {self.function}"

    @property
    def source_line(self) -> str:
        """The stripped source text of the line, or '' when the file is not readable."""
        return linecache.getline(self.filename, self.lineno).strip()


def _library_dirs() -> tuple[str, ...]:
    dirs = {
        os.path.abspath(p) + os.sep
        for key in ("stdlib", "platstdlib")
        if (p := sysconfig.get_paths().get(key))
    }
    return tuple(sorted(dirs))


_STDLIB_DIRS = _library_dirs()


@lru_cache(maxsize=4096)
def is_user_code(filename: str) -> bool:
    """True when *filename* belongs to the application rather than a library or the runtime."""
    if not filename or filename.startswith("<"):
        return False  # <frozen ...>, <string>: runtime internals
    path = os.path.abspath(filename)
    if path.startswith(_DEMO_DIR):
        return True
    if path.startswith(PACKAGE_PREFIX):
        return False
    parts = path.split(os.sep)
    if "site-packages" in parts or "dist-packages" in parts:
        idx = max(i for i, p in enumerate(parts) if p in ("site-packages", "dist-packages"))
        top = parts[idx + 1] if idx + 1 < len(parts) else ""
        top = top.removesuffix(".py")
        return top not in _LIBRARY_PACKAGES and not top.startswith("_")
    return not any(path.startswith(d) for d in _STDLIB_DIRS)


def location_of(frame: FrameType) -> Location:
    """The location a live frame is currently at."""
    code = frame.f_code
    return Location(code.co_filename, frame.f_lineno or 0, code.co_qualname)


def stack_of(frame: FrameType | None, limit: int = 64) -> tuple[Location, ...]:
    """The stack ending at *frame*, outermost first (as tracebacks print it)."""
    out: list[Location] = []
    while frame is not None and len(out) < limit:
        out.append(location_of(frame))
        frame = frame.f_back
    out.reverse()
    return tuple(out)


def current_stack(skip: int = 0, limit: int = 64) -> tuple[Location, ...]:
    """The caller's stack (ending at the caller), outermost first.

    *skip* drops that many more innermost frames (e.g. 1 to end at the caller's caller).
    """
    return stack_of(sys._getframe(skip + 1), limit)


def user_culprit(stack: Iterable[Location]) -> Location | None:
    """The innermost location in *stack* (outermost first) that is user code."""
    for loc in reversed(tuple(stack)):
        if is_user_code(loc.filename):
            return loc
    return None


def format_stack(stack: Iterable[Location]) -> str:
    """Format like :func:`traceback.format_stack`: ``File "...", line N, in f`` plus source."""
    lines = []
    for loc in stack:
        lines.append(f'  File "{loc.filename}", line {loc.lineno}, in {loc.function}')
        source = loc.source_line
        if source:
            lines.append(f"    {source}")
    return "\n".join(lines)


# --- origins: places remembered cheaply, made locations only when reported ------------------------
Origin = tuple[CodeType, int]
"""A place in running code as (code object, instruction offset ``f_lasti``). Reading both costs
tens of nanoseconds; ``frame.f_lineno`` costs up to ~2 us (CPython decodes the line table), so
the line is computed from an origin only when a finding needs it."""

_ORIGIN_SEARCH_DEPTH = 64
_MAX_LOCATIONS = 4096


def origin_line(origin: Origin) -> int:
    """The source line of an :data:`Origin`."""
    code, offset = origin
    for start, end, line in code.co_lines():
        if start <= offset < end and line is not None:
            return line
    return code.co_firstlineno


def origin_location(origin: Origin) -> Location:
    """The :class:`Location` of an :data:`Origin`."""
    return _location(*origin)


def user_origin(frame: FrameType | None, depth: int = _ORIGIN_SEARCH_DEPTH) -> Origin | None:
    """The first user-code frame from *frame* outwards (at most *depth* frames), as an
    :data:`Origin` (no line yet)."""
    for _ in range(depth):
        if frame is None:
            return None
        code = frame.f_code
        if is_user_code(code.co_filename):
            return code, frame.f_lasti
        frame = frame.f_back
    return None


# (id(code), f_lasti) -> (code, its Location). The code object is kept in the value, so its id
# cannot be reused by another code object while the entry exists. Bounded; cleared when full.
_locations: dict[tuple[int, int], tuple[CodeType, Location]] = {}


def _location(code: CodeType, offset: int) -> Location:
    key = (id(code), offset)
    known = _locations.get(key)
    if known is not None:
        return known[1]
    location = Location(code.co_filename, origin_line((code, offset)), code.co_qualname)
    if len(_locations) >= _MAX_LOCATIONS:
        _locations.clear()
    _locations[key] = (code, location)
    return location


def frame_location(frame: FrameType) -> Location:
    """The location *frame* is at, like :func:`location_of`, but remembered per instruction:
    stacks taken again at the same places (an N+1 in every request of a route) skip computing
    line numbers and building locations."""
    return _location(frame.f_code, frame.f_lasti)


def origins_to_stack(origins: Sequence[Origin]) -> tuple[Location, ...]:
    """A stack captured as origins (innermost first) as locations, outermost first."""
    return tuple(_location(code, offset) for code, offset in reversed(origins))
