"""Models in: MODEL strings (zoo names, ``hf:<model_type>``, ``file.py:factory``) resolved to a
module and its example inputs (:mod:`autopart.models.model_spec`), and the built-in zoo."""
