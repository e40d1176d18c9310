"""FlexAttention backend of bi-level routing attention (CUDA).

The token sequence is laid out region by region, so a region is one block of FlexAttention's block
mask and the routing *is* the block mask: query block i attends to the key blocks index[b, i, :].
No routed keys/values are copied; the kernel skips every block the routing did not choose.

FlexAttention's kernels tile blocks, so each region is padded at its end to a multiple of 64 tokens
(on an H100 with torch 2.11, 16-token blocks found no valid bf16 kernel and failed the fp32 backward
inside a model; 64 worked in both). Padding tokens (and tokens padding the map to whole regions) are
never keys: a routed region that holds any is a *partial* block whose mask_mod drops them; a region
without padding is a *full* block, where the kernel evaluates no mask at all.
"""
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .partition import merge_heads, split_heads
from .routing import routed_matrix

_compiled = None
TILE = 64
# 'auto' picks FlexAttention where the routed copies of 'indexed' would be large: measured on an H100
# (torch 2.11, batch 8) it was 1.2-5.7x slower than 'indexed' at every shape, but its memory does not
# grow with top-k (150x125 map, top-k 16: 129 MB against 419 MB fp32).
MIN_ROUTED_TOKENS = 1024  # top-k x tokens per region
MIN_TOKENS_PER_REGION = 32  # smaller regions would be mostly padding in a 64-token block


def flex_supported(tokens_per_region: int, topk: int) -> bool:
    """Whether 'auto' should pick FlexAttention (CUDA only)."""
    return tokens_per_region >= MIN_TOKENS_PER_REGION and topk * tokens_per_region >= MIN_ROUTED_TOKENS


def padded_region_tokens(t: int) -> int:
    """Region length in the block layout: whole kernel tiles."""
    return -(-t // TILE) * TILE


def routing_block_mask(index: torch.Tensor, key_valid: torch.Tensor, block: int) -> BlockMask:
    """index: (B, R, k) routed key regions; key_valid: (R * block,) bool, False on padding.
    Returns the BlockMask over R * block tokens, one block per region."""
    b, r, k = index.shape
    dev = index.device
    region_full = key_valid.view(r, block).all(-1)  # (R,)
    is_full = region_full[index]  # (B, R, k)

    def compact(keep):  # the kept routed regions first, as FlexAttention's (B, 1, R, R) index lists
        order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)
        idx = torch.zeros(b, 1, r, r, dtype=torch.int32, device=dev)
        idx[..., :k] = torch.gather(index, -1, order)[:, None].to(torch.int32)
        return keep.sum(-1, dtype=torch.int32)[:, None], idx

    partial_num, partial_idx = compact(~is_full)
    full_num, full_idx = compact(is_full)
    # The same routing as a token-level mask_mod. The CUDA kernel calls it on partial blocks only; the
    # eager (reference) path applies it everywhere, so it must encode the routing exactly.
    routed = routed_matrix(index, r)

    def mask_mod(bi, hi, q_idx, kv_idx):
        return routed[bi, q_idx // block, kv_idx // block] & key_valid[kv_idx]

    return BlockMask.from_kv_blocks(partial_num, partial_idx, full_num, full_idx,
                                    BLOCK_SIZE=block, mask_mod=mask_mod)


def _compiled_flex():
    global _compiled
    if _compiled is None:
        # every (shape, dtype) compiles once; a model and the benchmarks use more than dynamo's default 8
        cfg = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 64))
        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


# A torch.compile'd model breaks its graph here and calls the separately compiled kernel: traced into
# the model's graph, building the block mask and calling flex_attention gave wrong outputs (a layer
# off by 0.3, logits by 10%) or failed to lower at most shapes (torch 2.14, CPU; tested in test_models.py).
@torch.compiler.disable
def flex_routed_attention(q, k, v, index: torch.Tensor, num_heads: int, scale: float,
                          valid_r=None, compiled: bool = None) -> torch.Tensor:
    """q, k, v: (B, R, T, C) regions; index: (B, R, k); valid_r: (R, T) real tokens or None.
    Returns (B, R, T, C)."""
    b, r, t, c = q.shape
    block = padded_region_tokens(t)
    key_valid = torch.ones(r, t, dtype=torch.bool, device=q.device) if valid_r is None else valid_r
    if block != t:
        q, k, v = (F.pad(x, (0, 0, 0, block - t)) for x in (q, k, v))
        key_valid = F.pad(key_valid, (0, block - t), value=False)
    q, k, v = (split_heads(x.reshape(b, r * block, c), num_heads) for x in (q, k, v))  # (B, h, N, d)
    block_mask = routing_block_mask(index, key_valid.reshape(-1), block)
    fn = _compiled_flex() if (q.is_cuda if compiled is None else compiled) else flex_attention
    opts = {}
    if q.is_cuda:  # pin tiles that divide the block (fwd: M, N; bwd: M1, N1, M2, N2)
        opts = dict(kernel_options={n: TILE for n in ("BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1",
                                                      "BLOCK_M2", "BLOCK_N2")})
    out = fn(q, k, v, block_mask=block_mask, scale=scale, **opts)  # (B, h, N, d)
    out = merge_heads(out).reshape(b, r, block, c)
    return out if block == t else out[:, :, :t]  # as crop_hw: no no-op slice (its backward zero-fills)
