"""Methods of a library class wrapped at class level, shared by every installed source of a kind.

Used where the library has no event for what a source must see (SQLAlchemy's ``Engine``,
asyncpg's ``Pool``, aiohttp's ``ClientSession``). The wrappers are made once and stay in place
while at least one source is installed; the last source to leave restores the originals. If
something wrapped one of them after us, its wrapper is left in place: ours, which does nothing
without installed sources, stays inside it as a pass-through rather than dropping theirs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

SourceT = TypeVar("SourceT")


class SharedWrappers(Generic[SourceT]):
    """Wrappers of some methods of *owner*, in place while any source is installed.

    *factories* maps a method name to a function that makes its wrapper from the original
    (``functools.wraps`` is the factory's business). Wrappers find the installed sources in
    :attr:`active`: always the same list object, changed in place, so a module can keep it in a
    global that its wrappers read on every call.
    """

    def __init__(self, owner: type[Any], factories: Mapping[str, Callable[[Any], Any]]) -> None:
        self.owner = owner
        self.active: list[SourceT] = []
        """The installed sources, in installation order."""
        self.originals: dict[str, Any] = {}
        """Method name -> the owner's own function, while wrapped (empty otherwise)."""
        self._factories = dict(factories)
        self._wrappers: dict[str, Any] = {}
        self._lock = threading.Lock()

    def join(self, source: SourceT) -> bool:
        """Install *source*; the first one wraps the methods. ``False``: it was installed."""
        with self._lock:
            if source in self.active:
                return False
            if not self.originals:
                for name, factory in self._factories.items():
                    original = self.owner.__dict__[name]
                    self.originals[name] = original
                    self._wrappers[name] = wrapper = factory(original)
                    setattr(self.owner, name, wrapper)
            self.active.append(source)
            return True

    def leave(self, source: SourceT) -> bool:
        """Uninstall *source*; the last one restores the originals. ``False``: it was not
        installed."""
        with self._lock:
            if source not in self.active:
                return False
            self.active.remove(source)
            if not self.active:
                for name, original in self.originals.items():
                    if self.owner.__dict__.get(name) is self._wrappers[name]:
                        setattr(self.owner, name, original)
                self.originals.clear()
                self._wrappers.clear()
            return True
