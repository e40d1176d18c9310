"""Multiply-accumulate counts that include attention.

torch's FlopCounterMode counts matmuls, convolutions and the CUDA SDPA kernels, but not the CPU SDPA
kernel (`_scaled_dot_product_flash_attention_for_cpu`): on CPU the attention itself would silently
count as zero, the same blind spot as the original's FLOP counter. `register_flop_formulas` (run when
biformer_lit.models is imported) adds its forward and backward to torch's registry, so every
FlopCounterMode user counts it, Lightning's model summary included. Routing is counted through its
affinity matmul; top-k and gathers are data movement, not arithmetic.

The paper's "FLOPs" are multiply-accumulates (fvcore convention); `count_gmacs` returns those.
`fvcore_gmacs` is the same count by fvcore, given handles for the ops it does not know.
"""
import copy
import math
from typing import Optional

import torch
import torch.nn as nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


def _attention_flops(query_shape, key_shape, value_shape) -> int:
    """q @ k^T and p @ v over (..., Sq, D) x (..., Sk, D): 2 flops per multiply-add."""
    *batch, sq, d = query_shape
    sk, dv = key_shape[-2], value_shape[-1]
    n = math.prod(batch)
    return 2 * n * sq * sk * d + 2 * n * sq * sk * dv


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return _attention_flops(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                            **kwargs) -> int:
    return 2 * _attention_flops(query_shape, key_shape, value_shape)  # dq, dk, dv, dp: four matmuls


CPU_SDPA = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flop,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flop}


def register_flop_formulas() -> None:
    """Add the CPU SDPA formulas to torch's FlopCounterMode registry (once; torch's own, if it has one, stays)."""
    for op, formula in CPU_SDPA.items():
        if op not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op)(formula)


@torch.no_grad()
def _probe(model: nn.Module, img_size, in_chans: Optional[int]):
    """A CPU, fp32, eval copy of the model counting the routed algorithm, and a zero image of img_size."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    if in_chans is None:
        in_chans = next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), 3)
    probe = copy.deepcopy(model).cpu().float().eval()
    for m in probe.modules():
        # count the routed algorithm (query x routed-key pairs), not a backend's execution of it:
        # 'masked' computes every pair densely and FlexAttention is CUDA-only
        if getattr(m, "kind", None) == "bra":
            m.backend = "indexed"
    return probe, torch.zeros(1, in_chans, h, w)


@torch.no_grad()
def count_gmacs(model: nn.Module, img_size, in_chans: Optional[int] = None) -> float:
    """GMACs of one forward of one image at img_size, on a CPU copy of the model in eval mode
    (in_chans: default the model's first convolution's)."""
    register_flop_formulas()
    probe, x = _probe(model, img_size, in_chans)
    counter = FlopCounterMode(display=False)
    with counter:
        probe(x)
    return counter.get_total_flops() / 2 / 1e9


def _fvcore_sdpa(inputs, outputs) -> int:
    from fvcore.nn.jit_handles import get_shape
    q, k, v = (get_shape(i) for i in inputs[:3])
    return _attention_flops(q, k, v) // 2  # fvcore counts multiply-adds


def _fvcore_none(inputs, outputs) -> int:
    return 0


FVCORE_HANDLES = {
    "aten::scaled_dot_product_attention": _fvcore_sdpa,
    # the CPU kernel the precision policy (attention/precision.py) calls directly
    "aten::_scaled_dot_product_flash_attention_for_cpu": _fvcore_sdpa,
    # data movement (routing's scatter into a bool matrix, top-k indices): no arithmetic
    "aten::scatter_": _fvcore_none, "aten::scatter": _fvcore_none, "aten::topk": _fvcore_none,
}


def fvcore_analysis(model: nn.Module, img_size, in_chans: Optional[int] = None):
    """fvcore's FlopCountAnalysis of one image at img_size (needs fvcore), with handles for the ops it lacks."""
    from fvcore.nn import FlopCountAnalysis
    probe, x = _probe(model, img_size, in_chans)
    analysis = FlopCountAnalysis(probe, x).set_op_handle(**FVCORE_HANDLES)
    return analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)


def fvcore_gmacs(model: nn.Module, img_size, in_chans: Optional[int] = None) -> float:
    """count_gmacs' number as fvcore counts it. fvcore also counts the normalisations (layer / batch norm),
    which FlopCounterMode does not: the only difference between the two."""
    return fvcore_analysis(model, img_size, in_chans).total() / 1e9
