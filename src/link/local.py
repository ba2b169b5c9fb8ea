"""The link interface the edge talks through, and its in-process form."""
from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class Link(Protocol):
    """Carries one request to the cloud and brings its reply back: bytes only."""

    def request(self, data: bytes) -> bytes: ...


class LocalLink:
    """Both sides in one process, still talking in bytes: exactly what two machines would exchange.

    It hosts the cloud as the cloud server does, with a host's two controls over its work: a check
    before each of the cloud's layers (the server's per-request deadline and cancel) and the end of
    a session, whose caches are freed at once.
    """

    def __init__(self, cloud) -> None:
        self.cloud = cloud

    def request(self, data: bytes) -> bytes:
        return self.cloud.handle(bytes(data))

    def watch(self, check: Callable[[], None] | None) -> None:
        """Run `check` before each of the cloud's layers (it raises to stop the request); None: no longer."""
        self.cloud.on_layer = check

    def end_session(self) -> None:
        self.cloud.end_session()
