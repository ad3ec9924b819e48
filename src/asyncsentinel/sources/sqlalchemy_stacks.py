"""Stacks across SQLAlchemy's asyncio greenlets, walked only when a finding needs them.

An ``AsyncEngine`` runs the sync engine in a greenlet whose stack ends at SQLAlchemy's
``greenlet_spawn``: the user's coroutine that awaited the statement is in the parent greenlet.
These functions continue a stack there. They read only ``f_code``/``f_lasti``/``f_back`` per
frame; line numbers and :class:`~asyncsentinel.frames.Location` objects are made from the
:data:`~asyncsentinel.frames.Origin` values when a finding is reported. Relies on the
``__sqlalchemy_greenlet_provider__`` marker of SQLAlchemy's asyncio greenlets (2.0 and 2.1).
"""

from __future__ import annotations

import sys
from types import FrameType
from typing import Any

from asyncsentinel.frames import (
    PACKAGE_PREFIX,
    Location,
    Origin,
    origin_location,
    origins_to_stack,
    user_origin,
)

try:  # SQLAlchemy's asyncio support runs the sync engine in greenlets (sqlalchemy[asyncio]).
    from greenlet import getcurrent as _greenlet_current  # type: ignore[import-untyped,unused-ignore]
except ImportError:  # pragma: no cover - only sync engines are possible without it
    _greenlet_current = None

_STACK_LIMIT = 64

# greenlet type -> whether it is SQLAlchemy's asyncio greenlet (a class attribute marks it).
_provider_types: dict[type[Any], bool] = {}


def _outer(greenlet: Any) -> tuple[FrameType | None, Any]:
    """Where a stack continues after the outermost frame of *greenlet*'s stack (``None``: the
    current greenlet): an ``AsyncEngine`` runs the sync engine in a greenlet whose stack ends at
    SQLAlchemy's ``greenlet_spawn``; the user's coroutine is in the parent greenlet."""
    if greenlet is None:
        greenlet = _greenlet_current() if _greenlet_current is not None else None
        if greenlet is None:
            return None, None
    kind = type(greenlet)
    provider = _provider_types.get(kind)
    if provider is None:
        provider = bool(getattr(kind, "__sqlalchemy_greenlet_provider__", False))
        if len(_provider_types) < 64:
            _provider_types[kind] = provider
    parent = greenlet.parent if provider else None
    return (parent.gr_frame, parent) if parent is not None else (None, None)


def origins_here(skip: int = 0) -> list[Origin]:
    """The caller's stack as origins (code, offset), innermost first, continued across an
    asyncio greenlet; asyncsentinel's own frames at the inner end are left out.

    Reads only ``f_code``/``f_lasti``/``f_back`` per frame (no line numbers, no
    :class:`Location`): :func:`~asyncsentinel.frames.origins_to_stack` makes locations of it
    when a finding is reported.
    """
    out: list[Origin] = []
    append = out.append
    frame: FrameType | None = sys._getframe(1 + skip)
    greenlet = None
    inner_end = True
    left = _STACK_LIMIT
    while left:
        if frame is None:
            frame, greenlet = _outer(greenlet)
            if frame is None:
                break
        code = frame.f_code
        if inner_end:
            if code.co_filename.startswith(PACKAGE_PREFIX):
                frame = frame.f_back
                continue
            inner_end = False
        append((code, frame.f_lasti))
        frame = frame.f_back
        left -= 1
    return out


def stack_here() -> tuple[Location, ...]:
    """The caller's stack, outermost first, continued across an asyncio greenlet.

    asyncsentinel's own frames at the inner end are left out: the stack ends where the
    application or a library handed control to asyncsentinel.
    """
    return origins_to_stack(origins_here(skip=1))


def origin_here(skip: int = 0) -> Origin | None:
    """The innermost user-code frame of the caller's stack, as an :data:`Origin`: no line
    number, no :class:`Location`, no stack (see :func:`culprit_here`).

    *skip* more frames are known not to be user code (asyncsentinel's own callers).
    """
    try:
        frame: FrameType | None = sys._getframe(1 + skip)
    except ValueError:  # a shorter stack than the caller thought: walk all of it
        frame = sys._getframe(1)
    greenlet = None
    # This greenlet's frames, then its parent's (where an AsyncEngine's caller runs), and so on.
    for _ in range(4):
        found = user_origin(frame, _STACK_LIMIT)
        if found is not None:
            return found
        frame, greenlet = _outer(greenlet)
        if frame is None:
            return None
    return None


def culprit_here() -> Location | None:
    """The innermost user-code frame of the caller's stack (no full stack built)."""
    origin = origin_here()
    return origin_location(origin) if origin is not None else None
