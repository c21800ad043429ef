"""Emit: a Plan or a ParallelProgram written as a standalone torchrun program
(:mod:`~autopart.codegen.emitter`), from the templates in :mod:`autopart.codegen.templates` that the
program copies verbatim."""
