from __future__ import annotations

import multiprocessing.process

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(autouse=True)
def _one_process_unless_marked(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fast tier runs in one process: a test that starts ranks must say so with
    ``@pytest.mark.distributed`` (CI runs that tier second)."""
    if request.node.get_closest_marker("distributed") is not None:
        return

    def refuse(self: multiprocessing.process.BaseProcess) -> None:
        raise RuntimeError(
            f"{request.node.nodeid} starts a process: mark it @pytest.mark.distributed"
        )

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse)
