"""BiFormer models: timm registration and conventions, published sizes, any input size, bad configs."""
import pytest
import timm
import torch

import biformer_lit  # noqa: F401  (registers the models)
from biformer_lit.models import PRESETS

SMALL = dict(depths=(1, 1, 1, 1), embed_dims=(32, 64, 128, 256), num_classes=7)


def count(model):
    return sum(p.numel() for p in model.parameters()) / 1e6


@pytest.mark.parametrize("name,millions", [("biformer_tiny", 13.1), ("biformer_small", 25.5),
                                           ("biformer_base", 56.8), ("biformer_stl", 28.4)])
def test_published_parameter_counts(name, millions):
    assert abs(count(timm.create_model(name)) - millions) < 0.1


def test_every_preset_is_registered_with_timm():
    assert set(PRESETS) <= set(timm.list_models("biformer*"))


@pytest.mark.parametrize("name", ["biformer_cpu_tiny", "biformer_cpu_small"])
def test_cpu_presets_forward_backward(name):
    m = timm.create_model(name, num_classes=5)
    y = m(torch.randn(2, 3, 64, 64))
    assert y.shape == (2, 5)
    y.sum().backward()
    assert all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize("name,size", [("biformer_tiny", (97, 131)), ("biformer_tiny", (200, 180)),
                                       ("biformer_stl", (200, 180)), ("biformer_stl", (225, 250))])
def test_any_input_size(name, size):
    m = timm.create_model(name, **SMALL).eval()
    with torch.no_grad():
        assert m(torch.randn(1, 3, *size)).shape == (1, 7)


def test_patch_stem_input_too_small_is_a_clear_error():
    """The patch stem's unpadded convs need 32 px per side: say so, not a conv kernel-size error."""
    m = timm.create_model("biformer_cpu_tiny", num_classes=3).eval()
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"input of 100x20 px; the patch stem needs at least 32 px per side"):
            m(torch.randn(1, 3, 100, 20))
        assert m(torch.randn(1, 3, 32, 33)).shape == (1, 3)
        assert timm.create_model("biformer_cpu_tiny", num_classes=3, stem="overlap").eval()(
            torch.randn(1, 3, 5, 3)).shape == (1, 3)  # the padded overlap stem takes any size


def test_timm_conventions():
    m = timm.create_model("biformer_cpu_tiny", num_classes=3)
    x = torch.randn(2, 3, 64, 64)
    feats = m.forward_features(x)
    assert feats.shape == (2, 256, 2, 2)
    assert m.forward_head(feats, pre_logits=True).shape == (2, 256)
    torch.testing.assert_close(m.forward_head(feats), m(x))
    m.reset_classifier(11)
    assert m(x).shape == (2, 11) and m.get_classifier().out_features == 11
    assert isinstance(m.no_weight_decay(), set)


def test_features_only_backbone():
    m = timm.create_model("biformer_cpu_tiny", features_only=True)
    outs = m(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == m.feature_info.channels() == [32, 64, 128, 256]
    assert [o.shape[-1] for o in outs] == [16, 8, 4, 2] and m.feature_info.reduction() == [4, 8, 16, 32]


def test_forward_intermediates_and_getter_features_follow_timm():
    m = timm.create_model("biformer_cpu_tiny").eval()
    x = torch.randn(2, 3, 64, 64)
    final, inter = m.forward_intermediates(x)
    torch.testing.assert_close(final, m.forward_features(x))
    assert [t.shape[1] for t in inter] == [32, 64, 128, 256]
    last_two = m.forward_intermediates(x, indices=2, intermediates_only=True)  # an int: the last n stages
    assert [t.shape[1] for t in last_two] == [128, 256]
    assert [t.shape[1] for t in m.forward_intermediates(x, indices=[-1], intermediates_only=True)] == [256]
    getter = timm.create_model("biformer_cpu_tiny", features_only=True, feature_cls="getter", out_indices=(1, 3))
    assert [t.shape[1] for t in getter(x)] == [64, 256]


def test_forward_intermediates_stop_early_leaves_the_final_norm_to_the_last_stage():
    """timm: stop_early before the last stage returns that stage's map un-normed (the final BatchNorm
    is sized for the last stage; it was applied to stage 1's 64 channels and failed)."""
    m = timm.create_model("biformer_cpu_tiny").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, inter = m.forward_intermediates(x, indices=[1], stop_early=True)
        assert final.shape == (2, 64, 8, 8) and torch.equal(final, inter[0])
        final, _ = m.forward_intermediates(x, indices=[3], stop_early=True)
        torch.testing.assert_close(final, m.forward_features(x))


def test_pruning_before_the_last_stage_drops_the_final_norm():
    """timm: pruning to an earlier stage removes the final norm (sized for the last stage) and the head,
    and num_features follows the kept stage; a getter with norm=True then works."""
    import copy
    from timm.models._features import FeatureGetterNet
    x = torch.randn(2, 3, 64, 64)
    full = timm.create_model("biformer_cpu_tiny").eval()
    m = copy.deepcopy(full)
    assert m.prune_intermediate_layers((0, 1)) == [0, 1]
    assert m.num_features == m.head_hidden_size == 64
    with torch.no_grad():
        final, inter = m.forward_intermediates(x)
        assert final.shape == (2, 64, 8, 8) and m(x).shape == (2, 64, 8, 8)  # head pruned: unpooled
        ref = full.forward_intermediates(x, indices=(0, 1), intermediates_only=True)
        got = FeatureGetterNet(copy.deepcopy(full), out_indices=(0, 1), norm=True)(x)
        assert len(got) == 2
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name,stem,size", [("biformer_tiny", "stem.conv1", 224), ("biformer_stl", "stem.conv", 224),
                                            ("biformer_cpu_tiny", "stem.conv", 64),
                                            ("biformer_cpu_stl", "stem.conv", 112)])
def test_pretrained_cfg_describes_the_built_model(name, stem, size):
    """first_conv names the stem's conv (timm adapts it for in_chans != 3), input_size the preset's size."""
    from timm.models import get_pretrained_cfg
    m = timm.create_model(name)
    assert dict(m.named_modules())[m.pretrained_cfg["first_conv"]].kernel_size[0] in (3, 4)
    assert m.pretrained_cfg["first_conv"] == stem and get_pretrained_cfg(name).first_conv == stem
    assert timm.data.resolve_model_data_config(m)["input_size"] == (3, size, size)
    assert timm.create_model(name, img_size=(size * 2, size)).pretrained_cfg["input_size"] == (3, size * 2, size)


@pytest.mark.parametrize("name,size", [("biformer_tiny", 200), ("biformer_tiny", (97, 131)), ("biformer_stl", 200),
                                       ("biformer_cpu_stl", 112)])
def test_pretrained_cfg_pool_size_is_the_final_feature_map(name, size):
    """The overlap stem pads (sizes round up): at 200 px its final map is 7x7, not 200 // 32 = 6."""
    m = timm.create_model(name, img_size=size, **SMALL).eval()
    h, w = (size, size) if isinstance(size, int) else size
    with torch.no_grad():
        assert tuple(m.forward_features(torch.randn(1, 3, h, w)).shape[-2:]) == m.pretrained_cfg["pool_size"]


def test_released_weights_adapt_to_one_input_channel(tmp_path):
    """timm sums the first conv's RGB kernels for in_chans=1 when first_conv names the stem's conv (it
    named a layer the patch stem does not have: loading failed with a size mismatch)."""
    sd = timm.create_model("biformer_cpu_tiny").state_dict()
    torch.save({"model": sd}, tmp_path / "w.pth")
    m = timm.create_model("biformer_cpu_tiny", pretrained=True, in_chans=1,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "w.pth")))
    torch.testing.assert_close(m.stem.conv.weight[:, 0], sd["stem.conv.weight"].sum(1))


def test_gmacs_follow_the_model_input_channels():
    from biformer_lit.flops import count_gmacs
    one = count_gmacs(timm.create_model("biformer_cpu_tiny", in_chans=1), 64)
    three = count_gmacs(timm.create_model("biformer_cpu_tiny"), 64)
    # only the 4x4 patchify conv (32 outputs on a 16x16 map) sees the two extra channels
    assert three - one == pytest.approx(2 * 16 * 16 * 32 * 4 * 4 / 1e9)


def test_gradient_checkpointing_gives_same_gradients():
    m = timm.create_model("biformer_cpu_tiny", num_classes=3)
    x = torch.randn(2, 3, 64, 64)
    m(x).sum().backward()
    ref = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.set_grad_checkpointing(True)
    m(x).sum().backward()
    for a, p in zip(ref, m.parameters()):
        torch.testing.assert_close(p.grad, a)


def test_per_stage_attention_kinds():
    m = timm.create_model("biformer_cpu_tiny", attn=["window", "axial", "shifted_window", "full"],
                          n_wins=[4, 2, 2, 1])
    kinds = [a.kind for _, _, a in m.attention_modules()]
    # a shifted_window stage alternates plain and shifted windows (Swin)
    assert kinds == ["window", "axial", "window", "shifted_window", "full"]
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_drop_path_only_in_training():
    m = timm.create_model("biformer_cpu_tiny", drop_path_rate=0.5).eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(m(x), m(x))


@pytest.mark.parametrize("kwargs,match", [
    (dict(topks=(4, 4, 17, 1)), r"topk=17 is out of range.*1\.\.4"),
    (dict(topks=(0, 4, 2, 1)), r"topk=0 is out of range"),
    (dict(n_wins=(4, 4, 8, 1)), r"n_wins\[2\]=8 is larger than stage 2's feature map 4x4"),
    (dict(embed_dims=(32, 64, 120, 256)), r"stage 2: width 120 is not divisible by head_dim=16"),
    (dict(num_heads=(2, 3, 4, 8)), r"stage 1: width 64 is not divisible by num_heads=3"),
    (dict(attn="sparse"), r"unknown attention 'sparse'; known: axial, bra, dilated, full, shifted_window, window"),
    (dict(topks=(1, 4, 16)), r"topks has 3 entries \[1, 4, 16\]; expected 4"),
    (dict(depths=(1, 1, 1, 1, 1)), r"depths has 5 entries"),
    (dict(stem="conv"), r"stem='conv'; allowed: overlap, patch"),
    (dict(depths=(-1, 2, 2, 2)), r"depths=\[-1, 2, 2, 2\]; allowed: integers >= 0"),
    (dict(drop_path_rate=1.0), r"drop_path_rate=1.0, drop_rate=0.0; allowed: \[0, 1\)"),
    (dict(n_wins=(4, 4, 2.0, 1)), r"n_win=2.0; allowed: an integer >= 1"),  # a float broke later models too
    (dict(topks=(4, 4, 2.5, 1)), r"topk=2.5; allowed: an integer"),
    (dict(global_pool=""), r"global_pool='' \(unpooled features\) needs num_classes=0, got num_classes=1000"),
    (dict(num_classes=-1), r"num_classes=-1; allowed: an integer >= 0"),
    (dict(num_heads=(0, None, None, None)), r"num_heads=\[0, None, None, None\]; allowed: integers >= 1"),
    (dict(mlp_ratios=0), r"mlp_ratios=\[0, 0, 0, 0\]; allowed: numbers > 0"),
    (dict(attn="window", attn_backend="bogus"), r"attn_backend='bogus'; allowed: auto, indexed"),
    (dict(qkv_bias="no"), r"qkv_bias=\['no', 'no', 'no', 'no'\]; allowed: true or false"),
    (dict(img_size=(64, 64, 3)), r"img_size=\(64, 64, 3\); allowed: a size, or \(height, width\), of at least 32"),
    (dict(img_size=16), r"img_size=16; allowed: .* at least 32 px \(four stages after the patch stem\)"),
])
def test_bad_configuration_is_rejected_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model("biformer_cpu_tiny", **kwargs)


def test_reset_classifier_checks_the_head():
    m = timm.create_model("biformer_cpu_tiny")
    with pytest.raises(ValueError, match=r"global_pool='max'; allowed: 'avg' or ''"):
        m.reset_classifier(10, "max")
    m.reset_classifier(0, "")
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 256, 2, 2)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["auto", "flex"])
def test_torch_compile_whole_model(backend, monkeypatch):
    """A compiled model gives the eager model's logits. With 'flex' the model's graph breaks at the
    attention and runs the separately compiled FlexAttention kernel (forced here: on CPU the default is
    its eager path); traced into the model's graph instead, torch 2.14 was 10% off or failed."""
    from biformer_lit.attention import bra_flex
    # flex: one routed stage, so one FlexAttention kernel to compile (each stage's shapes compile their own)
    attn = ("bra", "full", "full", "full") if backend == "flex" else ("bra", "bra", "bra", "full")
    m = timm.create_model("biformer_cpu_tiny", num_classes=4, depths=(1, 1, 1, 1), attn=attn,
                          attn_backend=backend).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        eager = m(x)  # 'flex' eagerly on CPU: its reference path, tested against the oracle
        kernel = bra_flex.flex_routed_attention
        monkeypatch.setattr(bra_flex, "flex_routed_attention", lambda *a, **kw: kernel(*a, **kw, compiled=True))
        # the model's graph through dynamo and AOT autograd (graph breaks, guards, decompositions); inductor's
        # code generation is tested where it is ours to get right: the FlexAttention kernel (test_attention)
        compiled = torch.compile(m, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_biformer_tiny_cuda_flex_matches_indexed():
    """FlexAttention in every routing stage of a whole model: same weights, the same logits and
    gradients as the portable 'indexed' backend (fp32: six kernels to compile, three stages x fwd/bwd)."""
    torch.manual_seed(0)
    flex = timm.create_model("biformer_tiny", attn_backend="flex").cuda().eval()  # eval: no drop path
    indexed = timm.create_model("biformer_tiny", attn_backend="indexed").cuda().eval()
    indexed.load_state_dict(flex.state_dict())
    x = torch.randn(2, 3, 224, 224, device="cuda")
    outs = []
    for m in (flex, indexed):
        y = m(x)
        y.square().mean().backward()
        outs.append((y.detach(), m.stem.conv1.weight.grad))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=5e-2, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_biformer_tiny_cuda_flex_trains_in_bf16():
    """bf16 autocast through FlexAttention in every routing stage: a finite loss and gradients."""
    torch.manual_seed(0)
    flex = timm.create_model("biformer_tiny", attn_backend="flex").cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = flex(torch.randn(2, 3, 224, 224, device="cuda")).float().logsumexp(-1).mean()
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(flex.stem.conv1.weight.grad).all()
