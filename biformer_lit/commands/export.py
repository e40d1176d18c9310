"""`python cli.py export --ckpt_path CKPT | --model NAME [--weights FILE] --output X.onnx|X.pt2`: the model as an
ONNX file or a torch.export program, loaded back and checked against eager on a sample input."""
from pathlib import Path
from typing import List, Optional

from . import CommandParser
from ..errors import UserError


def positive(text: str) -> int:
    import argparse
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}; allowed: an integer >= 1")
    return value


def load_checkpoint_model(path: Path):
    """The network of a ClassificationModule checkpoint, built by the module's create_model from the
    checkpoint's settings and loaded with its weights (the EMA copy, if any, is not used)."""
    from ..checkpoint import check_resume_checkpoint, load_init_weights, read_state_dict
    from ..module import create_model
    hp = check_resume_checkpoint(path, instead="--model NAME --weights FILE").get("hyper_parameters") or {}
    if "model" not in hp:
        raise UserError(f"{path} is a Lightning checkpoint of another module (no ClassificationModule settings); "
                        f"for its weights use --model NAME --weights {path}")
    model = create_model(hp["model"], hp.get("num_classes", 10), hp.get("img_size", 64), 0.0, hp.get("model_kwargs"))
    load_init_weights(model, str(path), hint="the checkpoint's own settings built a model it does not fit",
                      sd=read_state_dict(str(path)))
    return model


def main(argv: Optional[List[str]] = None) -> int:
    parser = CommandParser(prog="cli.py export",
                           description="Export a checkpoint or a model to ONNX (.onnx) or torch.export (.pt2), then "
                                       "print the largest difference from eager on a sample input.")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt_path", type=Path, help="Lightning checkpoint of a ClassificationModule")
    src.add_argument("--model", help="timm model name (with --weights; without: random init)")
    parser.add_argument("--weights", type=Path, help="weights for --model: {'model': sd}, Lightning or bare state dict")
    parser.add_argument("--output", type=Path, required=True, help="X.onnx or X.pt2")
    parser.add_argument("--img_size", type=positive, default=None,
                        help="input side in px (default: the size the model was built for)")
    parser.add_argument("--batch", type=positive, default=1,
                        help="batch of the check against eager (the exported batch is dynamic)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed usage / help
        return int(e.code or 0)
    if args.weights is not None and args.model is None:
        raise UserError("--weights goes with --model")
    if args.output.suffix.lower() not in (".onnx", ".pt2"):
        raise UserError(f"--output {args.output}: allowed: a file name ending in .onnx or .pt2")
    if not args.output.parent.is_dir():
        raise UserError(f"--output {args.output}: folder {args.output.parent} does not exist")
    from .visualize import load_weights_model, model_img_size
    from ..export import export
    model = load_checkpoint_model(args.ckpt_path) if args.ckpt_path else load_weights_model(args.model, args.weights)
    size = args.img_size or model_img_size(model)
    diff = export(model, args.output, (size, size), batch=args.batch)
    print(f"wrote {args.output}")
    print(f"largest difference from eager (batch {args.batch}, {size}x{size} px): {diff:.3g}")
    return 0
