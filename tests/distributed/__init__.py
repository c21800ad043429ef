"""Tests that spawn gloo ranks or run torchrun (``-m distributed``; a few one-process checks of the
same code live beside them, and the marker, not the folder, selects the tier)."""
