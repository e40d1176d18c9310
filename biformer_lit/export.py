"""Exporting a model: torch.export (.pt2) and ONNX (.onnx, the dynamo exporter), each checked against eager.

torch.export: the batch dimension is dynamic (`Dim.AUTO`, traced at batch 2; batch 1 runs too). Height and
width are fixed at the export size: padding to whole regions, the backend pick and the stem's size check
branch on them, and Dim.AUTO specialises them to the example's size rather than export every branch.
ONNX: translated from that program by the dynamo exporter, so it keeps the dynamic batch (onnxruntime
runs the file). Routing stays data-dependent in both: top-k is an op of the exported graph.
"""
import os
from typing import Tuple

import torch
from torch import nn

from .errors import UserError

FORMATS = (".pt2", ".onnx")
EXPORT_BATCH = 2  # torch.export specialises a dimension traced at size 1, so the batch is traced at 2


def export_program(model: nn.Module, img_size: Tuple[int, int], in_chans: int = 3) -> torch.export.ExportedProgram:
    """torch.export of the eval-mode model with a dynamic batch dimension."""
    x = torch.randn(EXPORT_BATCH, in_chans, *img_size)
    return torch.export.export(model.eval(), (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},))


def export_onnx(program: torch.export.ExportedProgram, path) -> None:
    """An exported program as one self-contained ONNX file. onnxscript's graph optimiser is skipped: it
    doubles the time and the check against eager passes without it."""
    torch.onnx.export(program, (), os.fspath(path), dynamo=True, external_data=False, optimize=False,
                      input_names=["images"], output_names=["output"], verbose=False)


def onnx_outputs(path, x: torch.Tensor) -> torch.Tensor:
    """The first output of the ONNX file on x, run by onnxruntime on the CPU."""
    import onnxruntime
    session = onnxruntime.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@torch.no_grad()
def max_difference(model: nn.Module, exported, x: torch.Tensor) -> float:
    """Largest absolute difference between the eager model and `exported` (a callable, or an .onnx path) on x."""
    want = model.eval()(x)
    got = onnx_outputs(exported, x) if isinstance(exported, (str, os.PathLike)) else exported(x)
    if got.shape != want.shape:
        raise AssertionError(f"exported output of shape {tuple(got.shape)}; eager gives {tuple(want.shape)}")
    return (got - want).abs().max().item()


def input_channels(model: nn.Module) -> int:
    """The channels of the model's first convolution (3 when it has none)."""
    return next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), 3)


def export(model: nn.Module, path, img_size: Tuple[int, int], batch: int = 1) -> float:
    """Write `path` (.pt2 or .onnx by its suffix), load it back and return its largest absolute difference
    from eager on a random (batch, channels, *img_size) input."""
    in_chans = input_channels(model)
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix not in FORMATS:
        raise UserError(f"{path}: unknown export format {suffix or '(no suffix)'!r}; allowed: {', '.join(FORMATS)}")
    model = model.eval()
    x = torch.randn(batch, in_chans, *img_size)
    program = export_program(model, img_size, in_chans)
    if suffix == ".onnx":
        export_onnx(program, path)
        return max_difference(model, path, x)
    torch.export.save(program, os.fspath(path))
    return max_difference(model, torch.export.load(os.fspath(path)).module(), x)
