"""Multiply-accumulate counts that include attention.

torch's FlopCounterMode counts matmuls, convolutions and the CUDA SDPA kernels, but not the CPU SDPA
kernel (`_scaled_dot_product_flash_attention_for_cpu`): on CPU the attention itself would silently
count as zero, the same blind spot as the original's FLOP counter. We add it. Routing is counted
through its affinity matmul; top-k and gathers are data movement, not arithmetic.

The paper's "FLOPs" are multiply-accumulates (fvcore convention); `count_gmacs` returns those.
"""
import copy
from typing import Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    *batch, sq, d = query_shape
    sk, dv = key_shape[-2], value_shape[-1]
    n = 1
    for b in batch:
        n *= b
    return 2 * n * sq * sk * d + 2 * n * sq * sk * dv  # q @ k^T and p @ v, 2 flops per multiply-add


CUSTOM = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flop}


@torch.no_grad()
def count_gmacs(model: torch.nn.Module, img_size, in_chans: Optional[int] = None) -> float:
    """GMACs of one forward of one image at img_size, on a CPU copy of the model in eval mode
    (in_chans: default the model's first convolution's)."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    if in_chans is None:
        in_chans = next((m.in_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)), 3)
    probe = copy.deepcopy(model).cpu().float().eval()
    for m in probe.modules():
        # count the routed algorithm (query x routed-key pairs), not a backend's execution of it:
        # 'masked' computes every pair densely and FlexAttention is CUDA-only
        if getattr(m, "kind", None) == "bra":
            m.backend = "indexed"
    counter = FlopCounterMode(display=False, custom_mapping=CUSTOM)
    with counter:
        probe(torch.zeros(1, in_chans, h, w))
    return counter.get_total_flops() / 2 / 1e9
