"""Benchmark suites behind ``autopart bench`` and ``benchmarks/``: the stage solver
(:mod:`~autopart.bench.solver`), the runtime (:mod:`~autopart.bench.runtime`) and tensor
parallelism (:mod:`~autopart.bench.tp`)."""
