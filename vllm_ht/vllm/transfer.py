"""The transfer op: where pseudo rows become W_s h^l of their anchor, inside vLLM's compiled model.

`torch.ops.vllm.ht_transfer(hidden, residual, weight, bias, layer, steps)` runs before each
transfer layer's decoder layer. It is registered with vLLM's `direct_register_custom_op`
(`vllm/utils/torch_utils.py`), as vLLM's own attention op is, so torch.compile keeps it as one
opaque call in the traced graph: the graph has no branch on whether a step has pseudo rows, and
vLLM's trace-once compilation (DYNAMO_TRACE_ONCE on CPU) serves plain and HT steps alike.

At run time the op reads the step (`HTStep`, in the forward context). It is functional (new
output tensors, as a custom op's outputs must not alias its inputs; measured: a mutating op cost
plain steps about 10% more in the compiled graph). Without pseudo rows it returns copies.
Otherwise, for each step s that joins at this layer (and that the next tree reads), with
h = hidden + residual of the anchors' real rows (the residual stream h^l):
    hidden[start + a * D + s] = W_s h[a] (+ b_s)      residual[same rows] = 0
Example: anchors at rows [2, 5], D = 2, start = 8, steps [0, 1] join here ->
    rows 8, 9 <- W_0 h[2], W_1 h[2];  rows 10, 11 <- W_0 h[5], W_1 h[5]
"""
from __future__ import annotations

import torch
from vllm.utils.torch_utils import direct_register_custom_op

from ..projections import project
from .attention import current_step


def ht_transfer(hidden: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                layer: int, steps: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden, residual [rows, d] -> new (hidden, residual); weight [k, d, d], bias [k, d] or None;
    layer: this transfer layer's index; steps: the steps s whose l_s is this layer."""
    hidden, residual = hidden.clone(), residual.clone()    # a custom op's outputs never alias its inputs
    step = current_step()
    p = step.pseudo if step is not None else None
    if p is None:
        return hidden, residual
    mine = [s for s in steps if s < p.depth]        # the steps joining here that the next tree reads
    if not mine:
        return hidden, residual
    anchors = p.anchors.to(hidden.device)
    h = hidden[anchors] + residual[anchors]                                  # [A, d]
    rows = hidden[p.start : p.start + p.num_rows].view(anchors.numel(), p.depth, -1)
    for s in mine:
        rows[:, s] = project(h, weight, bias, s)
    res = residual[p.start : p.start + p.num_rows].view(anchors.numel(), p.depth, -1)
    res[:, mine] = 0
    return hidden, residual


def _ht_transfer_fake(hidden: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None, layer: int, steps: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(hidden), torch.empty_like(residual)


direct_register_custom_op(op_name="ht_transfer", op_func=ht_transfer, mutates_args=[], fake_impl=_ht_transfer_fake)


class TransferJoin:
    """Mixed into a decoder layer's class (see `join_transfer`): the op, then the layer."""

    ht_layer: int
    ht_steps: list[int]

    def forward(self, positions, hidden_states, residual, **kwargs):
        hidden_states, residual = torch.ops.vllm.ht_transfer(hidden_states, residual, self.ht_weight, self.ht_bias,
                                                             self.ht_layer, self.ht_steps)
        return super().forward(positions, hidden_states, residual, **kwargs)


def join_transfer(layer: torch.nn.Module, index: int, steps: list[int], weight: torch.Tensor,
                  bias: torch.Tensor | None) -> None:
    """Make decoder layer `index` run the transfer op first. Its class becomes a subclass with
    TransferJoin mixed in, so parameter names (and vLLM's weight loading) stay as they are."""
    cls = type(layer)
    layer.__class__ = type(f"HT{cls.__name__}", (TransferJoin, cls), {})
    layer.ht_layer, layer.ht_steps = index, list(steps)
    layer.register_buffer("ht_weight", weight, persistent=False)
    layer.register_buffer("ht_bias", bias, persistent=False)
