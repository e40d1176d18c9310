"""Global attention: every token attends to every token."""
import torch
import torch.fx

from .base import TokenMixer
from .partition import merge_heads, sdpa, split_heads
from .registry import register_attention


@register_attention("full")
class FullAttention(TokenMixer):
    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, h, w, c = q.shape
        out = sdpa(split_heads(q.reshape(b, h * w, c), self.num_heads), split_heads(k.reshape(b, h * w, c), self.num_heads),
                   split_heads(v.reshape(b, h * w, c), self.num_heads), self.scale)
        return merge_heads(out).reshape(b, h, w, c)


torch.fx.wrap("sdpa")  # a leaf: its precision policy branches on the device
