"""LLaMA's SwiGLU activation, h = silu(a) * b, and what its feed-forward block saves for backward.

The block is w2(silu(w1 x) * w3 x) with a = w1 x and b = w3 x. Plain autograd saves, besides a and
b, two more (tokens x ffn_hidden) tensors per layer: silu(a), for the multiply, and h, for w2 (a
LoRA on w2 needs its input for dA). Both follow from a and b with one elementwise pass, so:
- `SwiGLU` saves only a and b and recomputes silu(a) in backward;
- inside `down_input_rebuilt(h)`, whatever saves h for backward (w2, whatever kind of layer it is)
  stores a reference to SwiGLU's backward node instead, and h is rebuilt from that node's a and b
  when needed, which is before SwiGLU's own backward runs.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


class SwiGLU(torch.autograd.Function):
    """h = silu(a) * b, saving only a and b for backward.

    forward   h = silu(a) * b,   silu(a) = a sigmoid(a)
    backward  db = dh silu(a),   da = dh b silu'(a),   silu'(a) = sigmoid(a) (1 + a (1 - sigmoid(a)))
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        return F.silu(a) * b

    @staticmethod
    @once_differentiable
    def backward(ctx, dh: torch.Tensor):
        a, b = ctx.saved_tensors
        da = torch.ops.aten.silu_backward(dh * b, a) if ctx.needs_input_grad[0] else None
        db = dh * F.silu(a) if ctx.needs_input_grad[1] else None
        return da, db


@contextlib.contextmanager
def down_input_rebuilt(h: torch.Tensor) -> Iterator[None]:
    """Within the block, a tensor saved for backward that is h (or a contiguous view of all of it) is
    stored as h's SwiGLU node and rebuilt from the node's saved a and b; the rest is saved as usual.

    Saved-tensor hooks override any outer ones, and autograd skips its in-place check for tensors
    saved under hooks. So nothing happens unless h comes straight from SwiGLU and no other policy
    (activation checkpointing, save_on_cpu, torch.compile) is in charge; an outer policy already
    decides what h costs. Every tensor saved here gets autograd's in-place check back in `unpack`.
    """
    if not _may_rebuild(h):
        yield
        return
    # Not h itself: autograd keeps the hooks with every saved tensor, and a closure over h would keep it alive.
    node, h_key = h.grad_fn, _identity(h)

    def pack(t: torch.Tensor):
        if _identity(t) == h_key and t.is_contiguous():
            return node, t.shape
        return t, t._version

    def unpack(packed):
        first, second = packed
        if isinstance(first, torch.Tensor):
            if first._version != second:
                raise RuntimeError(
                    f"one of the variables needed for gradient computation has been modified by an inplace "
                    f"operation: a {tuple(first.shape)} tensor saved by the feed-forward's down projection is at "
                    f"version {first._version}; expected version {second} instead"
                )
            return first
        a, b = first.saved_tensors
        return (F.silu(a) * b).view(second)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def _identity(t: torch.Tensor) -> tuple:
    """What makes a saved tensor h: the same memory, extent, dtype, and no in-place change since."""
    return t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype, t._version


def _may_rebuild(h: torch.Tensor) -> bool:
    if type(h.grad_fn) is not SwiGLU._backward_cls or torch.compiler.is_compiling():
        return False
    # torch answers "are other saved-tensor hooks active?" only privately; if that goes, do nothing.
    autograd = torch._C._autograd
    try:
        return autograd._saved_tensors_hooks_is_enabled() and autograd._top_saved_tensors_default_hooks(False) is None
    except AttributeError:
        return False
