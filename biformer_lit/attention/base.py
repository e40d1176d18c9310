"""The one interface every attention variant shares.

A variant is a TokenMixer: the same qkv projection, output projection and optional local-context
conv (LePE), so at equal width all variants have the same parameters and differ only in `mix`, the
choice of keys each query sees. Inputs and outputs are channels-last (B, H, W, C).
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from .precision import depthwise_conv

SCALE_MODES = ("head", "dim")
LEPE_SOURCES = ("v", "input")


def is_int(value) -> bool:
    """A plain integer: bool is an int subclass, but True is not a size."""
    return isinstance(value, int) and not isinstance(value, bool)


class TokenMixer(nn.Module):
    """Shared projections + LePE around a pattern-specific `mix`.

    Constructor vocabulary (identical for every variant; a variant ignores what it does not use):
      dim, num_heads        width and heads (dim must divide by heads)
      n_win                 regions / windows / grid groups per side (bra, window, shifted_window, dilated, axial)
      topk                  routed regions per query region (bra)
      stripe_width          stripe width in tokens (axial; default: the region edge, ceil(H / n_win))
      qkv_bias              bias of the qkv projection
      lepe_kernel           depthwise conv kernel of the local-context term; 0 disables it
      lepe_source           'v' (BiFormer's routing layers) or 'input' (the legacy global stage)
      scale_mode            'head': head_dim ** -0.5; 'dim': dim ** -0.5 (the original BiFormer's quirk)
      backend               implementation choice where a variant has several ('auto' picks)
    """

    kind = "base"
    stripe_width: Optional[int]  # typed for TorchScript (None would leave it untyped)

    def __init__(self, dim: int, num_heads: int, n_win: int = 7, topk: int = 4,
                 stripe_width: Optional[int] = None, qkv_bias: bool = True, lepe_kernel: int = 5,
                 lepe_source: str = "v", scale_mode: str = "head", backend: str = "auto"):
        super().__init__()
        # plain ints only: a float n_win (2.0) would build, then fail in forward
        for name, value, lo in (("dim", dim, 1), ("num_heads", num_heads, 1), ("n_win", n_win, 1),
                                ("topk", topk, None), ("lepe_kernel", lepe_kernel, 0),  # bra checks topk's range
                                ("stripe_width", 1 if stripe_width is None else stripe_width, 1)):
            if not is_int(value) or (lo is not None and value < lo):
                raise UserError(f"{name}={value!r}; allowed: an integer" + (f" >= {lo}" if lo is not None else ""))
        if dim % num_heads:
            raise UserError(f"dim={dim} is not divisible by num_heads={num_heads}")
        if scale_mode not in SCALE_MODES:
            raise UserError(f"scale_mode={scale_mode!r}; allowed: {', '.join(SCALE_MODES)}")
        if lepe_source not in LEPE_SOURCES:
            raise UserError(f"lepe_source={lepe_source!r}; allowed: {', '.join(LEPE_SOURCES)}")
        if lepe_kernel < 0 or (lepe_kernel and lepe_kernel % 2 == 0):
            raise UserError(f"lepe_kernel={lepe_kernel}; allowed: 0 (off) or an odd size")
        if n_win < 1:
            raise UserError(f"n_win={n_win}; allowed: >= 1")
        self.dim, self.num_heads, self.n_win, self.topk = dim, num_heads, n_win, topk
        self.stripe_width = stripe_width
        self.lepe_source = lepe_source
        self.scale_mode = scale_mode
        self.backend = backend
        self.scale = (dim if scale_mode == "dim" else dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.lepe = nn.Conv2d(dim, dim, lepe_kernel, padding=lepe_kernel // 2, groups=dim) if lepe_kernel else None
        # Visualisation hook: when `capture` is set, `mix` stores what it routed in `captured`.
        # Off by default, so training pays nothing for it.
        self.capture = False
        self.captured: Optional[dict] = None

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) queries, keys, values -> (B, H, W, C) attention output."""
        raise NotImplementedError

    def project(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v, each a contiguous (B, H, W, C). The qkv weight (one Linear, as in the released
        checkpoints) is sliced, not its output: slicing activations would zero-fill a gradient of the
        whole qkv output per slice in the backward."""
        wq, wk, wv = self.qkv.weight.chunk(3)
        bias = self.qkv.bias
        if bias is None:
            return F.linear(x, wq), F.linear(x, wk), F.linear(x, wv)
        bq, bk, bv = bias.chunk(3)
        return F.linear(x, wq, bq), F.linear(x, wk, bk), F.linear(x, wv, bv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.project(x)
        out = self.mix(q, k, v)
        lepe = self.lepe
        if lepe is not None:
            src = v if self.lepe_source == "v" else x
            # fp32 under bf16 autocast: the precision policy (precision.py)
            out = out + depthwise_conv(src.permute(0, 3, 1, 2), lepe.weight, lepe.bias).permute(0, 2, 3, 1)
        return self.proj(out)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, dim={self.dim}, heads={self.num_heads}, scale_mode={self.scale_mode}"
