from __future__ import annotations

import multiprocessing.process
from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _covered_ops_are_checked(request: pytest.FixtureRequest) -> Iterator[None]:
    """A TP rule test marked ``covers(op, ...)`` must have simulated a node of every op it names:
    the coverage test (test_tp_rules_coverage.py) counts a rule as tested by these marks."""
    declared = {name for mark in request.node.iter_markers("covers") for name in mark.args}
    if not declared:
        yield
        return
    from tests._tp_rule_check import TESTED

    TESTED.clear()
    yield
    missing = sorted(declared - TESTED)
    assert not missing, (
        f"{request.node.nodeid} is marked covers({missing}) but checked no such node"
    )


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> object:
    """The fast tier runs in one process: a test that starts ranks must say so with
    ``@pytest.mark.distributed`` (CI runs that tier second). Guarded for the whole protocol of
    the test, so a module- or session-scoped fixture it sets up is refused too."""
    if item.get_closest_marker("distributed") is not None:
        return (yield)

    def refuse(self: multiprocessing.process.BaseProcess) -> None:
        raise RuntimeError(f"{item.nodeid} starts a process: mark it @pytest.mark.distributed")

    start = multiprocessing.process.BaseProcess.start
    multiprocessing.process.BaseProcess.start = refuse  # type: ignore[method-assign]
    try:
        return (yield)
    finally:
        multiprocessing.process.BaseProcess.start = start  # type: ignore[method-assign]
