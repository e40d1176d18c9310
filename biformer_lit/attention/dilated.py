"""Dilated / grid attention (MaxViT's grid): tokens n_win apart along each axis form one group.

It differs from window attention by one pattern string: the group index is the fast axis.
"""
from .registry import register_attention
from .window import WindowAttention

GRID = "b (wh nh) (ww nw) c -> (b nh nw) (wh ww) c"


@register_attention("dilated")
class DilatedAttention(WindowAttention):
    """Token (r, c) attends to every token (r', c') with r' = r and c' = c modulo n_win."""

    pattern = GRID
