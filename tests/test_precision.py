"""The bf16 precision policy (attention/precision.py, docs/precision.md): what it keeps out of bf16, and
that bf16 autocast stays within bf16 rounding of fp32. CPU, small shapes: a few seconds."""
import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import biformer_lit.models  # noqa: F401  (registers the models)
from biformer_lit.attention import ATTENTIONS, create_attention
from biformer_lit.attention.partition import sdpa
from biformer_lit.attention.precision import affinity_fp64, sdpa_policy
from biformer_lit.attention.routing import region_means, route

FLASH = "aten._scaled_dot_product_flash_attention_for_cpu.default"
bf16 = torch.autocast("cpu", dtype=torch.bfloat16)


class OpDtypes(TorchDispatchMode):
    """Records the input dtypes of every aten op, as dispatched after autocast's casts."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [a for a in list(args) + list((kwargs or {}).values()) if isinstance(a, torch.Tensor)]
        self.seen.append((str(func), [a.dtype for a in tensors], [tuple(a.shape) for a in tensors]))
        return func(*args, **(kwargs or {}))


def test_route_does_not_flip_under_bf16_autocast():
    """Near-tied affinities (many regions, wide summaries): a bf16 matmul, as autocast would run
    it, flips some top-k choices; the policy's fp64 affinity keeps every one."""
    g = torch.Generator().manual_seed(0)
    q_r, k_r = torch.randn(4, 49, 256, generator=g), torch.randn(4, 49, 256, generator=g)
    _, ref = route(q_r, k_r, 16)
    with bf16:
        _, index = route(q_r, k_r, 16)
        naive = (q_r @ k_r.transpose(-1, -2)).topk(16, dim=-1).indices  # what the policy replaces
    assert not torch.equal(naive, ref), "input too easy: bf16 rounding flips nothing, the test proves nothing"
    assert torch.equal(index, ref)


def test_region_means_stay_fp32_under_bf16():
    x = torch.randn(2, 4, 9, 8).bfloat16()
    valid = torch.ones(4, 9, dtype=torch.bool)
    valid[-1, 5:] = False
    for v in (None, valid):
        m, _ = region_means(x, v)
        assert m.dtype == torch.float32


def test_sdpa_is_fp32_on_cpu_under_autocast():
    """Same values as fp32 SDPA on the same inputs, mask or not; the flash kernel never sees bf16."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 10, 8, generator=g) for _ in range(3))
    mask = torch.rand(3, 1, 10, 10, generator=g) > 0.4
    mask[..., 0] = True
    for m in (None, mask):
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.3)
        with bf16, OpDtypes() as ops:
            out = sdpa(q, k, v, 0.3, m)
        assert torch.allclose(out, ref, atol=1e-6, rtol=1e-5)
        assert [d for f, d, _ in ops.seen if f == FLASH] == [[torch.float32] * 3 + ([torch.float32] if m is not None else [])]


@pytest.mark.parametrize("kind", sorted(ATTENTIONS))
def test_every_variant_keeps_sdpa_fp32_and_stays_near_fp32(kind):
    torch.manual_seed(0)
    m = create_attention(kind, 32, 4, n_win=2, topk=2)
    x = torch.randn(2, 7, 9, 32)  # padded to whole regions / windows: the masked paths run too
    ref = m(x)
    with bf16, OpDtypes() as ops:
        out = m(x)
    flash = [d for f, d, _ in ops.seen if f == FLASH]
    assert flash and all(dt == torch.float32 for d in flash for dt in d), flash
    err = (out.float() - ref).norm() / ref.norm()
    assert err < 2e-2, f"{kind}: relative error {err:.3g} beyond bf16 rounding"


@pytest.mark.parametrize("backend", ["indexed", "masked", "gather"])
def test_bra_routing_unchanged_under_bf16_on_a_fixed_input(backend):
    """A fixed input whose regions differ clearly: bf16 autocast (bf16 q, k from the projection) routes
    exactly as fp32 does, for every CPU backend."""
    torch.manual_seed(0)
    m = create_attention("bra", 32, 4, n_win=4, topk=3, backend=backend)
    regions = torch.randn(1, 4, 1, 4, 1, 32) * 3  # one vector per region, plus token noise
    x = (regions + 0.1 * torch.randn(2, 4, 4, 4, 4, 32)).reshape(2, 16, 16, 32)
    m.capture = True
    m(x)
    ref = m.captured["index"]
    with bf16:
        m(x)
    assert torch.equal(m.captured["index"], ref)


def test_model_bf16_within_rounding_of_fp32():
    torch.manual_seed(0)
    model = timm.create_model("biformer_cpu_tiny", num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        with bf16:
            out = model(x)
    err = (out.float() - ref).norm() / ref.norm()
    assert err < 5e-2, f"relative error {err:.3g}"


def test_helpers_script_and_keep_fp32_when_scripted():
    s_sdpa, s_aff = torch.jit.script(sdpa_policy), torch.jit.script(affinity_fp64)
    q = torch.randn(2, 2, 6, 4)
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    with bf16:
        assert s_sdpa(q, q, q, 0.5, mask).dtype == torch.float32
        assert s_aff(q[:, 0], q[:, 1]).dtype == torch.float32
    assert torch.allclose(s_sdpa(q, q, q, 0.5, mask), F.scaled_dot_product_attention(q, q, q, scale=0.5), atol=1e-6)


def test_sdpa_is_an_fx_leaf():
    """Its policy branches on the device, which symbolic tracing cannot follow: traced layers call it."""
    layer = create_attention("full", 8, 2).eval()
    gm = torch.fx.symbolic_trace(layer)
    assert any(n.op == "call_function" and n.target is sdpa for n in gm.graph.nodes)
    x = torch.randn(1, 4, 5, 8)
    assert torch.allclose(gm(x), layer(x))


def test_depthwise_convs_run_fp32_under_autocast():
    """LePE and the positional conv: never the bf16 conv (on CPU a slow kernel); and the helper scripts."""
    from biformer_lit.attention.precision import depthwise_conv
    conv = torch.nn.Conv2d(8, 8, 5, padding=2, groups=8)
    x = torch.randn(2, 8, 6, 7)
    with bf16:
        out = depthwise_conv(x, conv.weight, conv.bias)
        scripted = torch.jit.script(depthwise_conv)(x, conv.weight, conv.bias)
    assert out.dtype == torch.float32 and torch.allclose(out, conv(x), atol=1e-6)
    # scripted, it runs, but TorchScript's own autocast pass casts the conv to bf16 (known limitation)
    assert torch.allclose(scripted.float(), conv(x), atol=5e-2)
    model = timm.create_model("biformer_tiny", num_classes=4, depths=(1, 1, 1, 1))
    with bf16, OpDtypes() as ops:
        model(torch.randn(1, 3, 64, 64))
    depthwise = [d for f, d, s in ops.seen if "convolution" in f and s[1][1] == 1]  # weight (C, 1, k, k)
    assert len(depthwise) == 8 and all(dt == torch.float32 for d in depthwise for dt in d), depthwise
