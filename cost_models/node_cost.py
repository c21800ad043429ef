"""The cost of one graph node, as written by ``autopart.passes.annotate`` into ``node.meta["autopart"]``.

All counts are for one forward (or backward) execution with the example inputs' shapes. FLOPs follow
``torch.utils.flop_counter`` (a multiply-add is 2 FLOPs). Bytes are what a kernel would move through
device memory: every tensor input read once, every output written once; views move nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["NodeCost"]


@dataclass(frozen=True, slots=True)
class NodeCost:
    flops: int
    """Forward FLOPs."""
    backward_flops: int
    """FLOPs of this node's backward (gradients of the inputs that require grad)."""
    bytes_read: int
    bytes_written: int
    output_bytes: int
    """Bytes of the node's output tensor(s), whether or not they are views."""
    param_bytes: int
    """Bytes of the parameters this node consumes directly (see ``params``)."""
    params: tuple[str, ...]
    """Parameters consumed directly, by the model's own names (``model.named_parameters()``)."""
    buffer_bytes: int
    """Bytes of the (non-trainable) buffers this node consumes directly."""
    saved_from: tuple[str, ...]
    """Names of the nodes whose outputs this node's backward keeps alive (saved activations)."""
    private_saved_bytes: int
    """Bytes this node saves for backward that are neither its inputs nor parameters (its own
    output when it saves it, masks, softmax statistics, ...)."""
    requires_grad: bool
    """Whether the output takes part in autograd (depends on a trainable parameter)."""
    is_view: bool
    """Whether the output aliases an input (no data movement)."""
    dtype: str
    """dtype of the (first) output, e.g. ``"float32"``; ``""`` for non-tensor outputs."""
    module: str
    """Path of the innermost module that created the node (``""`` for the root module)."""
    module_type: str
    """Class name of that module, e.g. ``"Linear"``."""
    backward_weight_flops: int = 0
    """The part of ``backward_flops`` that computes parameter gradients (``dW = X^T dY`` of a
    linear); the rest computes the input gradients (``dX = dY W^T``). 0 without parameters."""

    @property
    def backward_input_flops(self) -> int:
        """The part of ``backward_flops`` that computes the gradients of the node's inputs."""
        return self.backward_flops - self.backward_weight_flops

    @property
    def bytes(self) -> int:
        """Memory traffic: bytes read plus bytes written."""
        return self.bytes_read + self.bytes_written
