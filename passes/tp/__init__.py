"""Tensor parallelism: how every node of a graph can run on the ranks of a ``tp`` group, and the
rewrite of a pipeline stage for one of them.

- :mod:`~autopart.passes.tp.placements`: the values: ``Placement`` (``R``, ``S(k)``, ``P``),
  ``Strategy`` and ``NodeStrategies``;
- :mod:`~autopart.passes.tp.rules`: the sharding rules, one module per op family, assembled into
  one table;
- :mod:`~autopart.passes.tp.strategies`: the query the TP ILP asks (``tp_strategies``,
  ``weight_matmuls``) and the collectives that move a tensor between placements;
- :mod:`~autopart.passes.tp.local`: what one rank holds and runs (local shapes, shards, the call a
  rank makes for a node);
- :mod:`~autopart.passes.tp.shard`: the TP pass (``shard_tp``), a stage as one rank runs it;
- :mod:`~autopart.passes.tp.check`: a plan accepted only where the rules offer its placements.
"""
