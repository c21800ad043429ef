"""Wall time of building a zoo model on the meta device and capturing it with torch.export.

    python benchmarks/zoo_export_time.py [MODEL ...]      (default: llama-70b gpt2)

Prints build and export seconds, total graph nodes and the ATen nodes of the first layer.
"""

from __future__ import annotations

import collections
import platform
import sys
import time

import torch

from autopart.models.model_spec import load_model


def _first_layer_ops(exported: torch.export.ExportedProgram) -> collections.Counter[str]:
    ops: collections.Counter[str] = collections.Counter()
    for node in exported.graph.nodes:
        scopes = [path for path, _ in node.meta.get("nn_module_stack", {}).values()]
        if node.op == "call_function" and any(
            s in ("model.layers.0", "transformer.h.0") for s in scopes
        ):
            ops[str(node.target)] += 1
    return ops


def main(names: list[str]) -> None:
    print(
        f"torch {torch.__version__}, python {platform.python_version()}, {torch.get_num_threads()} threads"
    )
    for name in names:
        start = time.perf_counter()
        loaded = load_model(name, batch=1, seq=128, device="meta")
        built = time.perf_counter()
        exported = torch.export.export(loaded.model, loaded.example_inputs, strict=False)
        done = time.perf_counter()
        ops = _first_layer_ops(exported)
        print(
            f"{name}: build {built - start:.2f} s, export {done - built:.2f} s, "
            f"{len(exported.graph.nodes)} nodes, {sum(ops.values())} per layer"
        )
        for target, count in sorted(ops.items()):
            print(f"    {count:2d}  {target}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["llama-70b", "gpt2"])
