"""close() and `with` for the objects that hold a model runtime (detectors, extractors).

One place for the lifecycle they share: a call after close() is refused with a ValueError
naming the object and what close() released, not failed on a None deep in the runtime.
"""

from __future__ import annotations

from typing import ClassVar, Generic, Self, TypeVar

Resource = TypeVar("Resource")


class Closable(Generic[Resource]):
    """Holds `_resource` (a model, a session, a runtime) until close(), which releases it
    for the garbage collector; `_held()` gives it, or the ValueError once closed. Close
    only when no thread will call again: calls under way keep what they read."""

    _resource: Resource | None
    _releases: ClassVar[str]  # what close() releases, as the error names it: "its session"

    def _held(self) -> Resource:
        """The resource; a ValueError once closed."""
        if self._resource is None:
            name = type(self).__name__
            raise ValueError(f"the {name} is closed (close() released {self._releases})")
        return self._resource

    def close(self) -> None:
        """Release the resource; later calls raise ValueError. Closing again does nothing."""
        self._resource = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
