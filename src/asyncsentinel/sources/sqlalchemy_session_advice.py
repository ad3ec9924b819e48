"""Start-up advice on SQLAlchemy sessions (``db_configuration_advice``, info, once per object).

* an ``async_sessionmaker`` (or a ``sessionmaker`` of ``AsyncSession``) left at
  ``expire_on_commit=True``, reported when it first makes a session;
* relationships left on the implicit ``lazy="select"``, reported once async sessions are in use
  (a sync application may lazy-load freely), located at their declaration in the model.
"""

from __future__ import annotations

import importlib
import linecache
import re
import sys
import weakref
from collections import deque
from types import FrameType
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapper

from asyncsentinel.findings import DB_CONFIGURATION_ADVICE, Dispatcher, Finding, Severity
from asyncsentinel.frames import Location, stack_of, user_culprit

# Strategies that never load implicitly on attribute access (or fail loudly instead).
_EXPLICIT_LAZY = frozenset(
    {"raise", "raise_on_sql", "selectin", "joined", "subquery", "immediate", "write_only"}
    | {"dynamic", "noload", None, False}
)


class SessionAdvice:
    """The advice part of :class:`~.sqlalchemy_sessions.SQLAlchemySessionSource`, a mixin: it
    reports through the source's dispatcher and error component, and the source sets
    ``_async_in_use`` and calls :meth:`_check_mappers` from its AsyncSession operation hooks."""

    dispatcher: Dispatcher
    _component: str

    def _init_advice(self) -> None:
        self._advised_makers: weakref.WeakSet[Any] = weakref.WeakSet()
        self._advised_relationships: weakref.WeakSet[Any] = weakref.WeakSet()
        self._mappers_to_check: deque[Mapper[Any]] = deque()
        self._async_in_use = False

    def _mapper_configured(self, mapper: Mapper[Any], class_: type[Any]) -> None:
        self._mappers_to_check.append(mapper)

    def maker_used(self, maker: Any, session: Any, frame: FrameType) -> None:
        """A session maker produced *session*; advise once per maker on its configuration."""
        try:
            if maker in self._advised_makers:
                return
            self._advised_makers.add(maker)
            if not isinstance(session, AsyncSession) or not session.sync_session.expire_on_commit:
                return
            kind = type(maker).__name__
            stack = stack_of(frame.f_back)
            self.dispatcher.emit(
                Finding.create(
                    DB_CONFIGURATION_ADVICE,
                    f"this {kind} makes AsyncSessions with expire_on_commit=True (the default): "
                    "after commit() every loaded attribute is expired and the next access "
                    "reloads it implicitly, which raises MissingGreenlet in async code; "
                    f"create it with {kind}(..., expire_on_commit=False)",
                    severity=Severity.INFO,
                    culprit=user_culprit(stack),
                    stack=stack,
                    evidence={"object": kind, "setting": "expire_on_commit", "value": True},
                    request=None,
                )
            )
        except Exception as exc:
            self.dispatcher.report_error(self._component, exc)

    def _queue_configured_mappers(self) -> None:
        """Mappers configured before this source was installed (the event covers later ones)."""
        try:
            registries = importlib.import_module("sqlalchemy.orm.mapper")._all_registries()
        except Exception:  # a private helper: without it only mappers configured later count
            return
        for registry in registries:
            self._mappers_to_check.extend(m for m in registry.mappers if m.configured)

    def _check_mappers(self) -> None:
        """Advise on relationships of configured mappers, once async sessions are in use."""
        if not self._async_in_use:
            return  # a sync application may lazy-load freely
        while self._mappers_to_check:
            mapper = self._mappers_to_check.popleft()
            for relationship in mapper.relationships:
                if relationship in self._advised_relationships:
                    continue
                self._advised_relationships.add(relationship)
                if relationship.lazy not in _EXPLICIT_LAZY:
                    self._advise_relationship(mapper.class_, relationship.key, relationship.lazy)

    def _advise_relationship(self, cls: type[Any], key: str, lazy: Any) -> None:
        attribute = f"{cls.__name__}.{key}"
        strategy = "select" if lazy is True else str(lazy)
        self.dispatcher.emit(
            Finding.create(
                DB_CONFIGURATION_ADVICE,
                f"relationship {attribute} uses lazy={strategy!r}: in async code an access "
                "that was not loaded eagerly raises MissingGreenlet, and awaitable_attrs in a "
                "loop runs one query per row; declare lazy='raise' (or 'selectin') and load it "
                "explicitly with selectinload()/joinedload()",
                severity=Severity.INFO,
                culprit=_declaration_of(cls, key),
                evidence={"object": "relationship", "relationship": attribute, "lazy": strategy},
                request=None,
            )
        )


def _declaration_of(cls: type[Any], key: str) -> Location | None:
    """Where ``key = relationship(...)`` is written in *cls*'s body (else the class line)."""
    filename = getattr(sys.modules.get(cls.__module__), "__file__", None)
    if not filename:
        return None
    lines = linecache.getlines(filename)  # once per model file, when advice is first given
    class_re = re.compile(rf"\s*class\s+{re.escape(cls.__name__)}\b")
    attribute_re = re.compile(rf"\s*{re.escape(key)}\s*[:=]")
    class_line = 0
    for number, line in enumerate(lines, start=1):
        if not class_line:
            if class_re.match(line):
                class_line = number
        elif attribute_re.match(line):
            return Location(filename, number, cls.__qualname__)
    return Location(filename, class_line, cls.__qualname__) if class_line else None
