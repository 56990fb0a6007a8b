"""The storage interface: bytes on string keys, picked by URL scheme."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator


class StoreError(Exception):
    """The store could not serve a request (outage, permission). Never a miss."""


class Store(ABC):
    """A flat key -> bytes store. Keys are ``/``-separated relative paths.

    Puts are idempotent and atomic: a reader sees a whole object or none.
    """

    url: str

    @abstractmethod
    def get(self, key: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""

    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` atomically (replacing any old object)."""

    @abstractmethod
    def contains(self, key: str) -> bool: ...

    @abstractmethod
    def size(self, key: str) -> int | None:
        """Byte size of the object, or None when it does not exist."""

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Remove the object; False when it was not there."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys that start with ``prefix``."""

    def version(self, prefix: str) -> object:
        """A cheap token that changes when keys under ``prefix`` are added or removed.

        None means the store cannot tell; callers then refresh on their own timer.
        """
        return None
