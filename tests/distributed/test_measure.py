"""Measuring a two-rank group when the timings are too noisy to fit: measured once more with twice
the repeats, and where that fails too a run plans on the device table and says why (the fit is
made to refuse on every rank, so the case does not depend on how busy the host is)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from autopart.cost_models.comm_fit import AlphaBeta, fit_alpha_beta
from autopart.cost_models.devices import get_device
from autopart.errors import AutopartError
from autopart.runtime import measure
from autopart.runtime.launch import end_rank

SIZES = (1 << 12, 1 << 16)


def _refusing_fit(failures: int, calls: list[int]) -> Any:
    """``fit_alpha_beta`` that refuses its first ``failures`` fits, then fits exact timings."""

    def fit(sizes: Any, times: Any) -> AlphaBeta:
        calls.append(1)
        if len(calls) <= failures:
            raise AutopartError("the timed messages do not get slower with size")
        return fit_alpha_beta(sizes, [1e-6 + n / 1e9 for n in sizes])

    return fit


def _worker(rank: int, store: str, cache: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        cpu = torch.device("cpu")
        calls: list[int] = []
        measure.fit_alpha_beta = _refusing_fit(1, calls)  # type: ignore[assignment]
        fits = measure.measure_comm(cpu, key="k", sizes_bytes=SIZES, repeats=1)
        measure.fit_alpha_beta = _refusing_fit(10**6, [])  # type: ignore[assignment]
        spec, source = measure.measured_or_table(
            get_device("cpu"), cpu, cache=measure.CommCache(Path(cache) / "comm.json")
        )
        if rank == 0:  # only rank 0 fits; the others receive its fits or its reason
            doc = {
                "fit_calls": len(calls),
                "collectives": len(fits.collectives),
                "link_beta": fits.p2p.beta_bytes_per_s,
                "spec_is_table": spec == get_device("cpu"),
                "source": source,
            }
            Path(out).write_text(json.dumps(doc))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    end_rank()


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_a_noisy_measurement_is_retried_then_planned_on_the_table(tmp_path: Path) -> None:
    out = tmp_path / "rank0.json"
    args = (str(tmp_path / "store"), str(tmp_path), str(out))
    mp.spawn(_worker, args=args, nprocs=2, join=True)
    doc = json.loads(out.read_text())
    # the refused fit (point-to-point) and, measured again, point-to-point and each collective
    assert doc["collectives"] >= 2 and doc["fit_calls"] == 2 + doc["collectives"]
    assert doc["link_beta"] == pytest.approx(1e9)
    assert doc["spec_is_table"] is True
    assert doc["source"].startswith("table (measuring this group's communication failed")
    assert "--comm table" in doc["source"]
