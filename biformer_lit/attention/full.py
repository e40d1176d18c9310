"""Global attention: every token attends to every token."""
from .base import TokenMixer
from .partition import merge_heads, sdpa, split_heads
from .registry import register_attention


@register_attention("full")
class FullAttention(TokenMixer):
    def mix(self, q, k, v):
        b, h, w, c = q.shape
        q, k, v = (split_heads(t.reshape(b, h * w, c), self.num_heads) for t in (q, k, v))
        return merge_heads(sdpa(q, k, v, self.scale)).reshape(b, h, w, c)
