"""Dilated / grid attention (MaxViT's grid): tokens n_win apart along each axis form one group.

It differs from window attention only by the group layout: the group index is the fast axis.
"""
from .registry import register_attention
from .window import WindowAttention


@register_attention("dilated")
class DilatedAttention(WindowAttention):
    """Token (r, c) attends to every token (r', c') with r' = r and c' = c modulo n_win."""

    def __init__(self, dim: int, num_heads: int, **kwargs):
        super().__init__(dim, num_heads, **kwargs)
        self.dilated = True
