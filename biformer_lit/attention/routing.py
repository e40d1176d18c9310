"""Region-level routing of bi-level routing attention: which key regions each query region attends to.

Routing is computed per input in every form of the model (eager, scripted, FX-traced: the two functions
are FX leaves, called at run time; exported: top-k is an op of the graph).
Routing is non-differentiable by design (topk picks indices; the region summaries are detached, as in
the original), so gradients flow only through the token-level attention.
"""
from typing import Optional, Tuple

import torch
import torch.fx

from .partition import fx_leaf

from .precision import affinity_fp64


@fx_leaf
def region_means(x: torch.Tensor, valid: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """x: (B, R, T, C) regions; valid: (R, T) real tokens or None. Mean over real tokens -> (B, R, C).

    Also returns (R,) bool of regions holding at least one real token (None without padding).
    The means are at least fp32 (precision policy: bf16 summaries could flip routing choices).
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    if valid is None:
        return x.mean(dim=2, dtype=acc), None
    count = valid.sum(-1)  # (R,)
    # summed in at least fp32: an fp16 region sum overflows (to inf: routing picks wrong) long before the mean
    s = (x * valid[None, :, :, None]).sum(dim=2, dtype=acc)
    return s / count.clamp(min=1)[None, :, None], count > 0


@fx_leaf
def route(q_regions: torch.Tensor, k_regions: torch.Tensor, topk: int,
          nonempty: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k key regions for every query region.

    q_regions, k_regions: (B, R, C) region summaries. Returns (affinity (B, R, R), index (B, R, topk)),
    index in torch.topk order (largest affinity first). Regions made only of padding are never chosen
    while a real one is left.
    """
    affinity = affinity_fp64(q_regions.detach(), k_regions.detach())  # never bf16: see precision.py
    if nonempty is not None:
        affinity = affinity.masked_fill(~nonempty[None, None, :], float("-inf"))
    return affinity, affinity.topk(topk, dim=-1).indices


def routed_matrix(index: torch.Tensor, n_regions: int) -> torch.Tensor:
    """index: (B, R, topk) -> (B, R, n_regions) bool, True where a query region routes to a key region."""
    b, r = index.shape[0], index.shape[1]
    return torch.zeros(b, r, n_regions, dtype=torch.bool, device=index.device).scatter_(2, index, True)


for _leaf in ("region_means", "route"):
    torch.fx.wrap(_leaf)
