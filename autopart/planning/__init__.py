"""Planning: the solver's view of a traced graph (:mod:`~autopart.planning.graph`, coarsened into
blocks by :mod:`~autopart.planning.blocks`), pipeline schedules as data and their simulator
(:mod:`~autopart.planning.schedule`, drawn by :mod:`~autopart.planning.gantt`), the frozen
:class:`~autopart.planning.plans.Plan`, the planner that runs the solvers for one mesh
(:mod:`~autopart.planning.planner`) and the search over meshes (:mod:`~autopart.planning.mesh_search`)."""
