"""Stage solvers: the shared objective (:mod:`autopart.solver.cost`), baselines
(:mod:`autopart.solver.baselines`) and the stage ILP (:mod:`autopart.solver.stage_ilp`)."""
