"""Capture: a model as a ``torch.fx.GraphModule`` whose nodes carry fake values, shapes and source
modules (:mod:`autopart.capture.tracing`: torch.export with an fx fallback; repeated layers traced
once by :mod:`autopart.capture._repeat`)."""
