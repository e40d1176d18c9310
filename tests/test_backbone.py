"""The models as a backbone for other tools: TorchScript, FX (torch, timm and torchvision feature extraction),
torch.export, ONNX, the export command, FLOP counters. Every registered model is checked in a small form
(one block per stage, a 64 px input, 2x2 regions); full-size numbers are in docs/backbone.md."""
import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import biformer_lit.models  # noqa: F401  (registers the models and the CPU attention's FLOP formula)
from biformer_lit.attention.routing import route
from biformer_lit.models.biformer import PRESETS

SMALL = dict(depths=(1, 1, 1, 1), n_wins=(2, 2, 2, 1), topks=(1, 2, 3, 1), img_size=64)


def small(name: str, **kwargs) -> torch.nn.Module:
    return timm.create_model(name, **dict(SMALL, num_classes=5, **kwargs)).eval()


def scripted(model: torch.nn.Module):
    """The scripted model, run without the profiling executor's optimising passes (seconds per model here);
    what it computes is the same."""
    module = torch.jit.script(model)

    def run(x):
        with torch.jit.optimized_execution(False):
            return module(x)

    return run


def images(seed: int, batch: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def routes(graph_module: torch.fx.GraphModule, x: torch.Tensor) -> list:
    """The top-k index of every `route` call of an FX graph, as it ran on x."""
    found = []

    class Recorder(torch.fx.Interpreter):
        def call_function(self, target, args, kwargs):
            out = super().call_function(target, args, kwargs)
            if target is route:
                found.append(out[1])
            return out

    Recorder(graph_module).run(x)
    return found


def eager_routes(model: torch.nn.Module, x: torch.Tensor) -> list:
    mixers = [m for m in model.modules() if getattr(m, "kind", None) == "bra"]
    for m in mixers:
        m.capture = True
    model(x)
    out = [m.captured["index"] for m in mixers]
    for m in mixers:
        m.capture, m.captured = False, None
    return out


@pytest.mark.parametrize("name", sorted(PRESETS))
@torch.no_grad()
def test_every_model_scripts_and_traces_to_the_eager_outputs(name):
    model = small(name)
    x = images(0)
    want = model(x)
    assert torch.equal(scripted(model)(x), want)
    assert torch.equal(torch.fx.symbolic_trace(model)(x), want)


@torch.no_grad()
def test_every_attention_kind_scripts_and_traces():
    # every variant, at a size that pads (stage maps 15, 8, 4, 2 from 60 px)
    for attn in (("window", "shifted_window", "dilated", "axial"), ("bra", "axial", "bra", "full")):
        model = small("biformer_cpu_tiny", attn=attn)
        x = images(1, size=60)
        want = model(x)
        assert torch.equal(scripted(model)(x), want), attn
        traced = torch.fx.symbolic_trace(model)
        assert torch.equal(traced(x), want), attn
    assert torch.equal(scripted(traced)(x), want)  # FX, then TorchScript: the leaves script too


@torch.no_grad()
def test_routing_stays_data_dependent_after_tracing_and_scripting():
    model = small("biformer_cpu_tiny")
    traced, script = torch.fx.symbolic_trace(model), scripted(model)
    a, b = images(2), images(3)
    eager_a, eager_b = eager_routes(model, a), eager_routes(model, b)
    assert any(not torch.equal(i, j) for i, j in zip(eager_a, eager_b))  # the two inputs route differently
    for got, want in ((routes(traced, a), eager_a), (routes(traced, b), eager_b)):
        assert len(got) == len(want) and all(torch.equal(i, j) for i, j in zip(got, want))
    assert torch.equal(script(a), model(a)) and torch.equal(script(b), model(b))


@torch.no_grad()
def test_timm_fx_features_and_torchvision_feature_extractor_match_eager():
    from torchvision.models.feature_extraction import create_feature_extractor
    x = images(4)
    model = small("biformer_tiny")  # overlap stem
    features = timm.create_model("biformer_tiny", features_only=True, feature_cls="fx", **SMALL).eval()
    features.graph_module.load_state_dict(model.state_dict(), strict=False)
    want = model.forward_intermediates(x, intermediates_only=True)
    assert all(torch.equal(g, w) for g, w in zip(features(x), want))
    model = small("biformer_cpu_tiny")  # patch stem
    got = create_feature_extractor(model, {f"stages.{i}": str(i) for i in range(4)})(x)
    want = model.forward_intermediates(x, intermediates_only=True)
    assert all(torch.equal(got[str(i)], w) for i, w in enumerate(want))


def test_a_traced_model_still_rejects_a_too_small_input():
    traced = torch.fx.symbolic_trace(small("biformer_cpu_tiny"))
    with pytest.raises(ValueError, match=r"input of 20x100 px; the patch stem needs at least 32 px"):
        traced(torch.randn(1, 3, 20, 100))


@pytest.mark.filterwarnings("ignore")
@torch.no_grad()
def test_the_export_command_writes_a_program_with_a_dynamic_batch_that_also_runs_as_onnx(tmp_path):
    from biformer_lit.cli import main
    from biformer_lit.export import export_onnx, max_difference
    model = timm.create_model("biformer_cpu_tiny", num_classes=5).eval()
    weights, out = tmp_path / "w.pt", tmp_path / "m.pt2"
    torch.save({"model": small("biformer_cpu_tiny").state_dict()}, weights)
    args = ["export", "--model", "biformer_cpu_tiny", "--weights", str(weights), "--output", str(out),
            "--img_size", "64", "--batch", "2"]
    assert main(args) == 2 and not out.exists()  # weights of another layout: a one-line error, status 2
    torch.save({"model": model.state_dict()}, weights)
    assert main(args) == 0 and out.is_file()
    program = torch.export.load(str(out))
    for batch in (1, 3):  # traced at batch 2
        assert max_difference(model, program.module(), images(5, batch)) < 1e-5
    export_onnx(program, tmp_path / "m.onnx")  # the .onnx route of the command, from the same program
    assert max_difference(model, str(tmp_path / "m.onnx"), images(6, 3)) < 1e-5


def test_the_export_command_refuses_bad_arguments(tmp_path):
    from biformer_lit.cli import main
    assert main(["export", "--model", "biformer_cpu_tiny", "--output", str(tmp_path / "m.txt")]) == 2
    assert main(["export", "--output", str(tmp_path / "m.onnx")]) == 2  # no model
    assert main(["export", "--model", "biformer_cpu_tiny", "--output", str(tmp_path / "m.pt2"), "--batch", "0"]) == 2
    assert not list(tmp_path.iterdir())


def test_flop_counters_agree():
    from biformer_lit.flops import count_gmacs, fvcore_analysis
    model = small("biformer_cpu_tiny")
    ours = count_gmacs(model, 64)
    counter = FlopCounterMode(display=False)  # as Lightning's summary uses it: no custom mapping
    with counter, torch.no_grad():
        model.eval()(torch.zeros(1, 3, 64, 64))
    ops = counter.get_flop_counts()["Global"]
    assert ops.get(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu, 0) > 0
    # fvcore also counts the normalisations (FlopCounterMode does not); nothing else differs
    analysis = fvcore_analysis(model, 64)
    by_op = analysis.by_operator()
    norms = by_op.get("layer_norm", 0) + by_op.get("batch_norm", 0)
    assert (analysis.total() - norms) / 1e9 == pytest.approx(ours, rel=1e-6)


def test_the_export_command_builds_a_checkpoints_model_from_its_settings(tmp_path):
    from biformer_lit.commands.export import load_checkpoint_model
    kwargs = dict(depths=[1, 1, 1, 1])
    net = timm.create_model("biformer_cpu_tiny", num_classes=7, **kwargs)
    ckpt = {"pytorch-lightning_version": "2.5.0", "state_dict": {f"model.{k}": v for k, v in net.state_dict().items()},
            "hyper_parameters": dict(model="biformer_cpu_tiny", num_classes=7, img_size=64, model_kwargs=kwargs)}
    torch.save(ckpt, tmp_path / "last.ckpt")
    loaded = load_checkpoint_model(tmp_path / "last.ckpt").eval()
    x = images(7)
    with torch.no_grad():
        assert torch.equal(loaded(x), net.eval()(x))
