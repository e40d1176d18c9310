"""FlexAttention backend of bi-level routing attention (CUDA).

The token sequence is laid out region by region, so a region is one block of FlexAttention's block
mask and the routing *is* the block mask: query block i attends to the full key blocks index[b, i, :].
No routed keys/values are copied; the kernel skips every block the routing did not choose.
"""
import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .partition import merge_heads, split_heads

_compiled = None


def flex_supported(tokens_per_region: int) -> bool:
    """Block sizes FlexAttention's CUDA kernels tile: powers of two from 16 tokens (e.g. 8x8 or 4x4 regions)."""
    t = tokens_per_region
    return t >= 16 and t & (t - 1) == 0


def routing_block_mask(index: torch.Tensor, tokens_per_region: int) -> BlockMask:
    """index: (B, R, k) routed key regions -> BlockMask over R*T tokens, one block per region."""
    b, r, k = index.shape
    full_idx = torch.zeros(b, 1, r, r, dtype=torch.int32, device=index.device)
    full_idx[..., :k] = index[:, None].to(torch.int32)
    full_num = torch.full((b, 1, r), k, dtype=torch.int32, device=index.device)
    partial_num = torch.zeros_like(full_num)
    # The same routing as a token-level mask_mod: the CUDA kernel never calls it on full blocks,
    # but the eager (reference) path applies only mask_mod, so it must be exact too.
    routed = torch.zeros(b, r, r, dtype=torch.bool, device=index.device)
    routed.scatter_(2, index, True)

    def mask_mod(bi, hi, q_idx, kv_idx):
        return routed[bi, q_idx // tokens_per_region, kv_idx // tokens_per_region]

    return BlockMask.from_kv_blocks(partial_num, torch.zeros_like(full_idx), full_num, full_idx,
                                    BLOCK_SIZE=tokens_per_region, mask_mod=mask_mod)


def flex_routed_attention(q, k, v, index: torch.Tensor, num_heads: int, scale: float,
                          compiled: bool = None) -> torch.Tensor:
    """q, k, v: (B, R, T, C) regions; index: (B, R, k). Returns (B, R, T, C)."""
    global _compiled
    b, r, t, c = q.shape
    q, k, v = (split_heads(x.reshape(b, r * t, c), num_heads) for x in (q, k, v))  # (B, h, N, d)
    block_mask = routing_block_mask(index, t)
    fn = flex_attention
    if compiled if compiled is not None else q.is_cuda:
        if _compiled is None:
            _compiled = torch.compile(flex_attention, dynamic=False)
        fn = _compiled
    tile = min(t, 64)
    opts = dict(kernel_options={"BLOCK_M": tile, "BLOCK_N": tile}) if q.is_cuda else {}
    out = fn(q, k, v, block_mask=block_mask, scale=scale, **opts)  # (B, h, N, d)
    return merge_heads(out).reshape(b, r, t, c)
