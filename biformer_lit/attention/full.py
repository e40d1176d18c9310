"""Global attention: every token attends to every token."""
from .base import TokenMixer
from .partition import merge_heads, sdpa, split_heads
from .registry import register_attention


@register_attention("full")
class FullAttention(TokenMixer):
    def mix(self, qkv):
        b, h, w, c3 = qkv.shape
        q, k, v = (split_heads(t, self.num_heads) for t in qkv.reshape(b, h * w, c3).chunk(3, dim=-1))
        return merge_heads(sdpa(q, k, v, self.scale)).reshape(b, h, w, c3 // 3)
