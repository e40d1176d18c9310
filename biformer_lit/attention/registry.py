"""Attention variants by name: every variant registers itself here so configs can pick one with a string."""
from typing import Callable, Dict

from ..errors import UserError

ATTENTIONS: Dict[str, type] = {}


def register_attention(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        if name in ATTENTIONS:
            raise ValueError(f"attention {name!r} is registered twice")
        ATTENTIONS[name] = cls
        cls.kind = name
        return cls

    return deco


def list_attentions() -> list:
    return sorted(ATTENTIONS)


def check_attention_name(name: str) -> None:
    if name not in ATTENTIONS:
        raise UserError(f"unknown attention {name!r}; known: {', '.join(list_attentions())}")


def create_attention(name: str, dim: int, num_heads: int, **kwargs):
    """Build the variant `name`; all variants take the same keyword vocabulary (see TokenMixer)."""
    check_attention_name(name)
    return ATTENTIONS[name](dim=dim, num_heads=num_heads, **kwargs)
