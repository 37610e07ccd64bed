"""Shared fixtures."""

import signal
from collections.abc import Iterator

import pytest


class Terminated(Exception):
    """What SIGTERM raises in a test that sends it, instead of ending pytest."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated


@pytest.fixture
def signal_handlers() -> Iterator[dict[int, type[BaseException]]]:
    """For the test, SIGINT raises KeyboardInterrupt (Python's own handler) and SIGTERM raises
    Terminated, whatever the test command started with: under nohup or as a background job
    SIGINT is ignored, and training installs no handler for an ignored signal. Yields what
    each signal raises."""
    handlers = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: _raise_terminated}
    previous = {s: signal.signal(s, handler) for s, handler in handlers.items()}
    yield {signal.SIGINT: KeyboardInterrupt, signal.SIGTERM: Terminated}
    for s, handler in previous.items():
        signal.signal(s, handler)
