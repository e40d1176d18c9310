"""Mixed-precision policy of the attention layers (bf16 autocast): which ops leave bf16, and why.

Measured per op on CPU (docs/precision.md):
  SDPA      fp32 on CPU. The CPU flash kernel's bf16 backward is ~3x slower than its fp32 one at
            BiFormer's shapes; the fp32 forward+backward is cheaper than the bf16 matmuls it replaces.
            CUDA keeps autocast's bf16 (flash / cuDNN kernels are fast in bf16).
  dw conv   LePE / positional depthwise convs in the weights' dtype (fp32 under autocast) on every
            device: on CPU autocast's bf16 depthwise conv falls to the slow (im2col) kernel, 20-50x slower
            than fp32's; channels-last weights do not help. Unmeasured on CUDA (no GPU here).
  routing   region summaries and affinities in fp32 / fp64 on every device, so bf16 rounding of the
            affinities never flips a top-k choice. They are tiny (regions x regions): free.

Everything here is plain tensor ops, so it scripts (torch.jit.script) and, as a leaf, traces (FX).
Autocast cannot be queried or turned off from TorchScript in torch 2.14 (a scripted
`torch.is_autocast_cpu_enabled()` crashes under autocast; a scripted `with torch.autocast(..., enabled=False)`
is ignored), so the helpers step around it instead: they call ops that are on none of autocast's cast lists
(the CPU flash-attention op itself; aten::convolution, which autocast's conv2d entry does not cover;
fp64 matmuls, which autocast never casts).
"""
from typing import Optional

import torch
import torch.nn.functional as F


def sdpa_policy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Scaled dot-product attention; q, k, v (G, heads, T, d), mask broadcastable, True = may attend.

    CPU: always fp32 (output in q's dtype). `F.scaled_dot_product_attention` is on CPU autocast's bf16
    list, so under autocast it would cast to bf16 whatever we pass; the flash op it dispatches to on CPU
    is not, and with fp32 inputs and an additive mask it is the very kernel fp32 SDPA runs (same values).
    """
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    dt = torch.promote_types(q.dtype, torch.float32)  # fp32, or fp64 for a fp64 model
    bias: Optional[torch.Tensor] = None
    if mask is not None:  # the op takes an additive mask of the query's dtype, not a boolean one
        bias = torch.zeros(mask.shape, dtype=dt, device=q.device).masked_fill(~mask, float("-inf"))
    out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.to(dt), k.to(dt), v.to(dt), 0.0, False, attn_mask=bias, scale=scale)[0]
    return out.to(q.dtype)


def affinity_fp64(q_regions: torch.Tensor, k_regions: torch.Tensor) -> torch.Tensor:
    """(B, R, C) x (B, R, C) -> (B, R, R) region affinities (fp32, or fp64 for fp64), computed in fp64.

    A plain matmul would run in bf16 under autocast (its rounding flips near-tied top-k choices);
    autocast never casts fp64, and at regions x regions the fp64 cost is nil."""
    out = q_regions.double() @ k_regions.double().transpose(-1, -2)
    return out.to(torch.promote_types(q_regions.dtype, torch.float32))


def depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Stride-1, size-keeping depthwise conv (odd kernel, padded by kernel // 2) of an NCHW x in `weight`'s
    dtype: fp32 under autocast (see above), the model's own dtype otherwise. aten::convolution, unlike conv2d, is not on autocast's bf16 list.
    Limitation: it scripts, but a *scripted* model under autocast still gets a bf16 conv (TorchScript's
    own autocast pass casts it); eager and FX-traced models get fp32."""
    # torch.ops.aten.convolution, not torch.convolution: TorchScript compiles the latter to _convolution,
    # which is on the bf16 list
    padding = weight.shape[-1] // 2
    return torch.ops.aten.convolution(x.to(weight.dtype), weight, bias, [1, 1], [padding, padding], [1, 1],
                                      False, [0, 0], weight.shape[0])
