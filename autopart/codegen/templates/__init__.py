"""Files copied verbatim into every emitted program: ``run.py`` (the launcher) and ``collectives.py``
(the TP collectives, which the runtime imports too, so both run the same code). They import torch
only, never autopart."""
