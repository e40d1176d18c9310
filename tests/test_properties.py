"""Property-based tests (hypothesis) over attention configurations and input sizes: every valid
configuration runs and keeps shapes; every invalid one is rejected up front with a ValueError whose
message names the offending value, never a crash deep inside."""
import math

import pytest
import timm
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import biformer_lit.models  # noqa: F401  (registers the models with timm)
from biformer_lit.attention import create_attention, list_attentions
from biformer_lit.attention.reference import reference_forward

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def attention_case(draw):
    kind = draw(st.sampled_from(list_attentions()))
    heads = draw(st.sampled_from([2, 3, 4]))
    dim = heads * draw(st.sampled_from([4, 8]))
    h, w = draw(st.integers(1, 19)), draw(st.integers(1, 19))
    n_win = draw(st.integers(1, 6))
    topk = draw(st.integers(1, n_win * n_win))
    stripe = draw(st.none() | st.integers(1, 6))
    lepe = draw(st.sampled_from([0, 3, 5]))
    return dict(kind=kind, dim=dim, heads=heads, size=(h, w), n_win=n_win, topk=topk, stripe=stripe, lepe=lepe)


@FAST
@given(attention_case(), st.integers(1, 2))
def test_valid_attention_runs_keeps_shape_and_matches_oracle(case, batch):
    m = create_attention(case["kind"], case["dim"], case["heads"], n_win=case["n_win"], topk=case["topk"],
                         stripe_width=case["stripe"], lepe_kernel=case["lepe"]).double()
    x = torch.randn(batch, *case["size"], case["dim"], dtype=torch.double)
    y = m(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    torch.testing.assert_close(y, reference_forward(m, x), rtol=1e-8, atol=1e-8)


@FAST
@given(kind=st.sampled_from(list_attentions()), dim=st.integers(1, 64), heads=st.integers(-2, 9),
       n_win=st.integers(-2, 8), topk=st.integers(-3, 70), lepe=st.integers(-1, 6))
def test_any_configuration_is_built_or_rejected_clearly(kind, dim, heads, n_win, topk, lepe):
    valid = (heads >= 1 and dim % heads == 0 and n_win >= 1 and (lepe == 0 or (lepe > 0 and lepe % 2 == 1))
             and (kind != "bra" or 1 <= topk <= n_win * n_win) and (kind != "axial" or heads >= 2))
    if valid:
        m = create_attention(kind, dim, heads, n_win=n_win, topk=topk, lepe_kernel=lepe)
        assert m(torch.randn(1, n_win, n_win + 1, dim)).shape == (1, n_win, n_win + 1, dim)
    else:
        with pytest.raises(ValueError) as err:
            create_attention(kind, dim, heads, n_win=n_win, topk=topk, lepe_kernel=lepe)
        msg = str(err.value)
        assert any(f"{name}={value}" in msg for name, value in
                   (("dim", dim), ("num_heads", heads), ("n_win", n_win), ("topk", topk), ("lepe_kernel", lepe))), msg


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(h=st.integers(64, 130), w=st.integers(64, 130), kind=st.sampled_from(list_attentions()),
       n_win=st.integers(1, 4))
def test_model_any_input_size(h, w, kind, n_win):
    m = timm.create_model("biformer_cpu_tiny", num_classes=3, attn=[kind, kind, kind, "full"],
                          n_wins=[n_win, n_win, min(n_win, 4), 1], topks=[1, min(2, n_win * n_win), 1, 1]).eval()
    with torch.no_grad():
        assert m(torch.randn(1, 3, h, w)).shape == (1, 3)


@settings(max_examples=25, deadline=None)
@given(topks=st.lists(st.integers(-1, 20), min_size=4, max_size=4),
       n_wins=st.lists(st.integers(0, 9), min_size=4, max_size=4))
def test_model_configuration_is_built_or_rejected_clearly(topks, n_wins):
    maps = [16, 8, 4, 2]  # biformer_cpu_tiny at 64x64
    valid = all(1 <= n <= m for n, m in zip(n_wins[:3], maps[:3])) and \
        all(1 <= k <= n * n for k, n in zip(topks[:3], n_wins[:3])) and n_wins[3] >= 1
    kwargs = dict(num_classes=3, topks=topks, n_wins=n_wins)
    if valid:
        assert timm.create_model("biformer_cpu_tiny", **kwargs) is not None
    else:
        with pytest.raises(ValueError, match=r"topk=|n_win"):
            timm.create_model("biformer_cpu_tiny", **kwargs)
