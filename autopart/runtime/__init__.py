"""Runtime: a Plan becomes this rank's part of a training program on torch.distributed
(:mod:`~autopart.runtime.program`: ``compile`` and ``ParallelProgram``), checked against the unsharded
model (:mod:`~autopart.runtime.verify`), and run on local gloo ranks by ``autopart run``
(:mod:`~autopart.runtime.launch`). The only package that creates process groups."""
