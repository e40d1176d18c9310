"""Every attention variant against the dense masked-softmax oracle (reference.py), over seeded sweeps."""
import pytest
import torch

from biformer_lit.attention import create_attention, list_attentions
from biformer_lit.attention.reference import (bra_pattern, bra_routing, reference_forward, region_of,
                                              window_pattern)

VARIANTS = ["bra", "window", "shifted_window", "axial", "dilated", "full"]
SIZES = [(14, 14), (13, 17), (9, 5), (16, 12), (7, 7)]


def test_registry_has_every_variant():
    assert sorted(VARIANTS) == list_attentions()


@pytest.mark.parametrize("kind", VARIANTS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("n_win", [1, 2, 3, 4])
def test_variant_matches_oracle(kind, size, n_win):
    if n_win > min(size):
        pytest.skip("grid larger than map")
    topk = min(3, n_win * n_win)
    m = create_attention(kind, 32, 4, n_win=n_win, topk=topk).double()
    x = torch.randn(2, *size, 32, dtype=torch.double)
    torch.testing.assert_close(m(x), reference_forward(m, x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("size", [(14, 14), (9, 5)])
def test_shifted_window_with_one_window_is_not_shifted(size):
    """One window covers the map: Swin does not shift it (a shift would cut the map into four pieces)."""
    torch.manual_seed(0)
    shifted = create_attention("shifted_window", 32, 4, n_win=1).double()
    plain = create_attention("window", 32, 4, n_win=1).double()
    plain.load_state_dict(shifted.state_dict())
    x = torch.randn(2, *size, 32, dtype=torch.double)
    torch.testing.assert_close(shifted(x), plain(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["indexed", "masked", "gather"])
@pytest.mark.parametrize("size,n_win,topk", [((28, 28), 7, 4), ((30, 26), 7, 8), ((16, 16), 4, 16), ((11, 9), 3, 1)])
def test_bra_backends_fp32_forward_backward(backend, size, n_win, topk):
    """fp32 (the training dtype) forward and input/weight gradients agree with the oracle."""
    m = create_attention("bra", 64, 2, n_win=n_win, topk=topk, backend=backend, scale_mode="dim")
    x = torch.randn(2, *size, 64, requires_grad=True)
    y, r = m(x), reference_forward(m, x)
    torch.testing.assert_close(y, r, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, m.qkv.weight, m.proj.weight, m.lepe.weight], g)
    want = torch.autograd.grad(r, [x, m.qkv.weight, m.proj.weight, m.lepe.weight], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size,n_win", [((32, 32), 2), ((16, 16), 4), ((30, 26), 7), ((21, 21), 3), ((9, 7), 2)])
def test_bra_flex_forward_matches_oracle(size, n_win):
    """The FlexAttention backend's block mask over any region size and map padding (its eager path on CPU;
    CUDA runs the compiled kernel, tested below)."""
    m = create_attention("bra", 32, 2, n_win=n_win, topk=2, backend="flex")
    x = torch.randn(2, *size, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x), reference_forward(m, x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("size,n_win,topk", [((16, 16), 4, 3), ((9, 7), 2, 2)])
def test_bra_flex_compiled_kernel_matches_oracle_on_cpu(size, n_win, topk):
    """The compiled FlexAttention kernel (inductor's CPU template, forward only) reads the block lists:
    it skips unlisted blocks and evaluates no mask on full ones. So unlike the eager path above, this
    fails if a padded region were listed as full or a routed one were missing (checked by hand: listing
    every routed region as full gives errors of 0.2 at (9, 7))."""
    from biformer_lit.attention import bra_flex
    eager_default = bra_flex.flex_routed_attention
    m = create_attention("bra", 32, 2, n_win=n_win, topk=topk, backend="flex")
    x = torch.randn(2, *size, 32)
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(bra_flex, "flex_routed_attention", lambda *a, **kw: eager_default(*a, **kw, compiled=True))
        torch.testing.assert_close(m(x), reference_forward(m, x), rtol=1e-4, atol=1e-5)


def bf16_against_fp32_oracle(m, x, compiled_flex=False):
    """Run `m` under CPU bf16 autocast; return (output, oracle) where the fp32 oracle uses the routing
    the bf16 run chose (region affinities from bf16 q/k may order near-ties differently)."""
    from biformer_lit.attention import bra_flex
    eager = bra_flex.flex_routed_attention
    m.capture = True
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.MonkeyPatch.context() as mp:
        if compiled_flex:
            mp.setattr(bra_flex, "flex_routed_attention", lambda *a, **kw: eager(*a, **kw, compiled=True))
        y = m(x)
    assert y.dtype == torch.bfloat16
    index = m.captured["index"] if m.kind == "bra" else None
    return y.float(), reference_forward(m, x, index)


@pytest.mark.parametrize("kind,backend", [("bra", "indexed"), ("bra", "masked"), ("bra", "gather"),
                                          ("window", "auto"), ("shifted_window", "auto"), ("axial", "auto"),
                                          ("dilated", "auto"), ("full", "auto")])
@pytest.mark.parametrize("size,n_win,topk", [((28, 28), 7, 4), ((30, 26), 7, 8)])
def test_bf16_autocast_matches_fp32_oracle(kind, backend, size, n_win, topk):
    """Mixed precision (the GPU training dtype, here on CPU): forward and input/weight gradients within
    bf16 rounding of the fp32 oracle, padded maps included."""
    m = create_attention(kind, 64, 2, n_win=n_win, topk=topk, backend=backend)
    x = torch.randn(2, *size, 64, requires_grad=True)
    y, r = bf16_against_fp32_oracle(m, x)
    torch.testing.assert_close(y, r, rtol=2e-2, atol=2e-2)
    g = torch.randn_like(r)
    params = [x, m.qkv.weight, m.proj.weight, m.lepe.weight]
    for a, b in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(r, params, g)):
        assert (a - b).norm() <= 2e-2 * b.norm(), float((a - b).norm() / b.norm())


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_bra_flex_bf16_forward_matches_oracle(compiled):
    """FlexAttention in bf16 (forward: no CPU backward), eager path and the compiled block-sparse kernel."""
    m = create_attention("bra", 64, 2, n_win=7, topk=4, backend="flex")
    with torch.no_grad():
        y, r = bf16_against_fp32_oracle(m, torch.randn(2, 30, 26, 64), compiled_flex=compiled)
    torch.testing.assert_close(y, r, rtol=2e-2, atol=2e-2)


def test_flex_block_mask_lists_routed_regions_full_or_partial():
    """Routed regions without padding are full blocks (no mask evaluated), those with padding partial;
    together they are exactly the routing."""
    from biformer_lit.attention.bra_flex import routing_block_mask
    index = torch.tensor([[[1, 2], [0, 3], [3, 1], [2, 0]]])  # (B=1, R=4, k=2)
    block = 16
    key_valid = torch.ones(4, block, dtype=torch.bool)
    key_valid[2, 10:] = False  # region 2 holds padding
    bm = routing_block_mask(index, key_valid.reshape(-1), block)
    routed = torch.zeros(1, 4, 4, dtype=torch.bool).scatter_(2, index, True)
    assert torch.equal(bm.to_dense()[:, 0].bool(), routed)
    full = torch.zeros(1, 4, 4, dtype=torch.bool)
    for q in range(4):
        n = int(bm.full_kv_num_blocks[0, 0, q])
        full[0, q, bm.full_kv_indices[0, 0, q, :n].long()] = True
    assert torch.equal(full, routed & torch.tensor([True, True, False, True]))


def test_auto_backend_policy():
    """CPU: 'masked' for small regions while the token mask is small, else 'indexed'; CUDA picks
    FlexAttention only where 'indexed' would copy many routed tokens."""
    from biformer_lit.attention.bra import pick_backend
    from biformer_lit.attention.bra_flex import flex_supported
    m = create_attention("bra", 32, 2, n_win=7, topk=4)
    g = create_attention("bra", 32, 2, n_win=7, topk=4, backend="gather")
    q = lambda b, t: torch.zeros(b, 49, t, 32)  # (B, R, T, C) regions  # noqa: E731
    assert pick_backend(m.backend, q(8, 4), 4, m.topk) == "masked"  # 2x2 regions (stage 3 at 224)
    assert pick_backend(m.backend, q(8, 64), 64, m.topk) == "indexed"  # 8x8 regions (stage 1 at 224)
    assert pick_backend(m.backend, q(512, 9), 9, m.topk) == "indexed"  # small regions, but a 400 MB token mask
    assert pick_backend(g.backend, q(8, 4), 4, g.topk) == "gather"
    assert flex_supported(396, 16) and flex_supported(64, 16)  # large input / large top-k
    assert not flex_supported(64, 1) and not flex_supported(16, 64)  # little to copy / mostly padding


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("backend", ["flex", "indexed", "masked", "auto"])
@pytest.mark.parametrize("size,n_win,topk", [((56, 56), 7, 4), ((28, 28), 7, 4), ((30, 26), 7, 8), ((14, 14), 7, 16)])
def test_bra_cuda_backends(backend, size, n_win, topk):
    """Compiled CUDA kernels (fp32; FlexAttention may use TF32) against the dense oracle, forward and backward."""
    m = create_attention("bra", 64, 2, n_win=n_win, topk=topk, backend=backend).cuda()
    x = torch.randn(2, *size, 64, device="cuda", requires_grad=True)
    y, r = m(x), reference_forward(m, x)  # fp32 oracle: the same routing decisions as the kernel
    g = torch.randn_like(y)
    gx, gr = (torch.autograd.grad(out, x, g)[0] for out in (y, r))
    print(f"{backend} {size}: max |y - ref| {(y - r).abs().max():.2e}, max |dx - ref| {(gx - gr).abs().max():.2e}")
    torch.testing.assert_close(y, r, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(gx, gr, rtol=2e-3, atol=2e-3)


@pytest.mark.gpu
@cuda
def test_flex_memory_does_not_grow_with_topk():
    """At the stage-1 map of a 600x500 image, FlexAttention's peak memory is the same for top-k 1 and 16:
    no routed key/value copies (one such copy at top-k 16 would be ~160 MB)."""
    peaks = {}
    for topk in (1, 16):
        m = create_attention("bra", 64, 2, n_win=7, topk=topk, backend="flex").cuda()
        x = torch.randn(1, 150, 125, 64, device="cuda", requires_grad=True)
        m(x).sum().backward()  # compile outside the measurement
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        m(x).sum().backward()
        torch.cuda.synchronize()
        peaks[topk] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    print(f"flex peak MB at 150x125: {peaks}")
    assert peaks[16] - peaks[1] < 16, peaks


@pytest.mark.parametrize("kind", VARIANTS)
def test_gradients_reach_every_parameter(kind):
    """Routing (top-k) is non-differentiable by design; every trainable weight still gets a gradient."""
    m = create_attention(kind, 32, 4, n_win=3, topk=2, lepe_kernel=3)
    m(torch.randn(2, 10, 11, 32)).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", VARIANTS)
def test_padded_tokens_are_not_keys(kind):
    """Non-divisible maps are padded internally; the output of the real tokens must not depend on how much
    padding there is: crop a divisible map's result against the oracle over the real tokens only."""
    m = create_attention(kind, 16, 2, n_win=4, topk=3).double()
    x = torch.randn(1, 13, 10, 16, dtype=torch.double)
    out = m(x)
    # oracle sees only the 13x10 real tokens, so any padded key would make the two differ
    torch.testing.assert_close(out, reference_forward(m, x))


def test_same_parameters_for_every_variant():
    counts = {k: sum(p.numel() for p in create_attention(k, 64, 4, n_win=4, topk=2).parameters()) for k in VARIANTS}
    assert len(set(counts.values())) == 1, counts


def test_region_means_do_not_overflow_in_fp16():
    """Padded regions are averaged by sum / count: in fp16 the sum of 441 tokens of 200 overflows (inf
    affinities, routing picks wrong) though the mean fits."""
    from biformer_lit.attention.routing import region_means
    valid = torch.ones(4, 441, dtype=torch.bool)
    valid[1, 400:] = False
    means, nonempty = region_means(torch.full((1, 4, 441, 8), 200.0, dtype=torch.half), valid)
    assert means.dtype == torch.float32 and nonempty.all()  # the precision policy: summaries stay >= fp32
    torch.testing.assert_close(means, torch.full((1, 4, 8), 200.0))


def test_routing_reference_picks_most_related_regions():
    """The oracle's routing itself: a key region made to match every query wins the top-1."""
    h = w = 8
    q = torch.ones(1, h * w, 4)
    k = torch.zeros(1, h * w, 4)
    region = region_of(h, w, 2)
    k[0, region == 3] = 5.0
    index = bra_routing(q, k, h, w, 2, 1)
    assert index.flatten().tolist() == [3, 3, 3, 3]
    allowed = bra_pattern(index, h, w, 2)[0]
    assert torch.equal(allowed, (region == 3)[None, :].expand(h * w, -1))


def test_window_pattern_blocks():
    allowed = window_pattern(4, 4, 2)
    assert allowed.sum() == 16 * 4 and allowed[0, 5] and not allowed[0, 2]


def test_capture_is_off_by_default_and_costs_nothing():
    m = create_attention("bra", 32, 2, n_win=2, topk=2)
    x = torch.randn(1, 8, 8, 32)
    y = m(x)
    assert m.captured is None
    m.capture = True
    y2 = m(x)
    assert torch.equal(y, y2)
    assert m.captured["index"].shape == (1, 4, 2) and m.captured["size"] == (8, 8)


@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="bra", topk=17, n_win=4), r"topk=17 is out of range.*1\.\.16"),
    (dict(kind="bra", topk=0, n_win=4), r"topk=0 is out of range"),
    (dict(kind="window", n_win=0), r"n_win=0"),
    (dict(kind="full", dim=30, num_heads=4), r"dim=30 is not divisible by num_heads=4"),
    (dict(kind="axial", num_heads=1, dim=48), r"num_heads=1 must be >= 2"),
    (dict(kind="flash"), r"unknown attention 'flash'; known: axial, bra, dilated, full, shifted_window, window"),
    (dict(kind="bra", backend="cuda"), r"backend='cuda'; allowed"),
    (dict(kind="window", scale_mode="x"), r"scale_mode='x'"),
])
def test_bad_configuration_is_rejected(kwargs, match):
    kwargs = dict(dict(dim=32, num_heads=4), **kwargs)
    with pytest.raises(ValueError, match=match):
        create_attention(kwargs.pop("kind"), **kwargs)
