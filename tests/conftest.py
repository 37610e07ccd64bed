"""Shared helpers and fixtures: the CLI in-process, one set of tiny moons runs, signals.

Test files import the helpers with `from conftest import run_cli, TINY` (pytest puts this
folder on the path); fixtures reach them by name.
"""

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from cmkit.cli import main

# 40 steps of batch 64 with a checkpoint every 20: seconds per run on 2 CPU cores
TINY = ["--steps", "40", "--batch-size", "64", "--no-progress", "--checkpoint-every", "20"]


def run_cli(*args) -> int:
    """`cmkit ARGS` in this process; returns the exit code."""
    return main([str(a) for a in args])


@pytest.fixture(scope="session")
def moons_runs(tmp_path_factory) -> Path:
    """A teacher, its CD student and an iCT run on moons, each trained for 40 steps; shared
    by every test file, so tests copy a run before changing it."""
    root = tmp_path_factory.mktemp("moons_runs")
    assert run_cli("train-teacher", "--data", "moons", "--out", root / "teacher", *TINY) == 0
    assert run_cli("distill", "--teacher", root / "teacher", "--out", root / "cd", *TINY) == 0
    assert run_cli("train", "--data", "moons", "--out", root / "ict", *TINY) == 0
    return root


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
