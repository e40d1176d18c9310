"""`python cli.py visualize --ckpt_path CKPT | --model NAME [--weights FILE] --image IMG [IMG...] --out DIR`:
each attention layer's routing / key pattern over the images, as PNGs (pictures: biformer_lit.visualize)."""
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from . import CommandParser
from ..errors import UserError, folder_arg


def build_parser() -> CommandParser:
    p = CommandParser(prog="cli.py visualize",
                      description="Draw each attention layer's routing / key pattern over images.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt_path", type=Path, help="Lightning checkpoint of a ClassificationModule (images are "
                     "normalised as its training data were)")
    src.add_argument("--model", help="timm model name (with --weights; without: random init)")
    p.add_argument("--weights", type=Path, help="state dict for --model: {'model': sd} or bare")
    p.add_argument("--trust_checkpoint", action="store_true",
                   help="allow full unpickling of --ckpt_path (only for files you trust)")
    p.add_argument("--image", type=Path, nargs="+", required=True)
    p.add_argument("--out", type=folder_arg, required=True, help="output folder for the PNGs")
    p.add_argument("--img_size", type=int, help="input size (default: the model's)")
    p.add_argument("--stage", type=int, nargs="+", help="stages to draw (default: all)")
    p.add_argument("--all_blocks", action="store_true", help="every block, not just the last of each stage")
    p.add_argument("--query", type=int, nargs="+",
                   help="query regions (row-major ids; default: 3 spread-out regions per layer)")
    p.add_argument("--query_point", type=float, nargs=2, default=(0.5, 0.5), metavar=("Y", "X"),
                   help="query token as fractions of image height/width (default: centre)")
    p.add_argument("--heat", action="store_true", help="add a panel with the query token's attention weights")
    return p


def check_args(args) -> None:
    """Values argparse cannot check by type alone."""
    missing = [p for p in [args.ckpt_path, args.weights, *args.image] if p is not None and not p.is_file()]
    if missing:
        raise UserError("file not found: " + ", ".join(str(p) for p in missing))
    if args.weights is not None and args.model is None:
        raise UserError("--weights goes with --model")
    if args.img_size is not None and args.img_size < 1:
        raise UserError(f"--img_size {args.img_size}; allowed: a positive size in pixels")
    if not all(0.0 <= v <= 1.0 for v in args.query_point):
        raise UserError(f"--query_point {args.query_point[0]} {args.query_point[1]}; allowed: fractions in [0, 1]")
    stems = [p.stem for p in args.image]
    twice = sorted({s for s in stems if stems.count(s) > 1})
    if twice:  # output files are named after the image: one picture would overwrite the other
        raise UserError(f"two --image files named {twice[0]!r}: pictures are named after the image; rename one")


def load_image(path: Path, size: int):
    """(3, size, size) image in [0, 1] (PIL, bicubic resize)."""
    import numpy as np
    import torch
    from PIL import Image
    try:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((size, size), Image.BICUBIC)
            return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # as the datasets catch them
        raise UserError(f"cannot read image {path}: {e}") from None


def normalise(x, mean, std):
    import torch
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def load_weights_model(name: str, weights: Optional[Path]):
    """timm model `name` (num_classes taken from the weights' head), loaded from an original-format
    {"model": sd}, a {"state_dict": ...} Lightning file or a bare state dict. No weights: random init."""
    import timm
    from .. import models  # noqa: F401  (registers the BiFormer models with timm)
    from ..checkpoint import load_init_weights, read_state_dict
    sd = read_state_dict(str(weights)) if weights is not None else None
    if not timm.is_model(name):
        raise UserError(f"--model {name}: no such timm model; e.g. {', '.join(timm.list_models('biformer*'))}")
    kwargs = {"num_classes": sd["head.weight"].shape[0]} if sd is not None and "head.weight" in sd else {}
    model = timm.create_model(name, pretrained=False, **kwargs)
    if sd is not None:
        load_init_weights(model, str(weights), hint=f"check that they are weights of {name}", sd=sd)
    return model


def load_checkpoint_model(path: Path, trust: bool) -> Tuple[object, Tuple[Sequence[float], Sequence[float]]]:
    """The checkpoint's network, and the (mean, std) its training data were normalised with: the images are
    normalised the same way, so the routing drawn is the routing the model computes on its own data
    (a model of the synthetic task routed most query regions elsewhere on ImageNet-normalised input)."""
    from ..checkpoint import check_resume_checkpoint
    from ..data.datamodule import normalisation_of
    from ..module import ClassificationModule
    # weights_only refuses arbitrary pickled objects; --trust_checkpoint lifts that for own files
    ckpt = check_resume_checkpoint(path, weights_only=not trust, instead="--model NAME --weights FILE",
                                   trust_hint="; if you trust the file, pass --trust_checkpoint")
    if "model" not in (ckpt.get("hyper_parameters") or {}):  # was built with defaults, then a traceback
        raise UserError(f"{path} is a Lightning checkpoint of another module (no ClassificationModule settings); "
                        f"for its weights use --model NAME --weights {path}")
    stats = normalisation_of(ckpt.get("datamodule_hyper_parameters") or {})
    return ClassificationModule.load_from_checkpoint(path, map_location="cpu", weights_only=not trust).model, stats


def model_img_size(net) -> int:
    """The input size the model was built for (BiFormer.img_size, else timm's pretrained_cfg)."""
    size = getattr(net, "img_size", None)
    if size is None:
        size = (getattr(net, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-2:]
    return size if isinstance(size, int) else int(size[0])


def run(args) -> List[Path]:
    import torch
    from ..visualize import (IMAGENET_MEAN, IMAGENET_STD, attention_layers, attention_weights, nonempty_regions,
                             record_layers, routing_figure, select_layers)
    check_args(args)
    if args.ckpt_path:
        net, (mean, std) = load_checkpoint_model(args.ckpt_path, args.trust_checkpoint)
    else:  # released / bare weights: ImageNet's statistics, as the released models were trained
        net, (mean, std) = load_weights_model(args.model, args.weights), (IMAGENET_MEAN, IMAGENET_STD)
    size = args.img_size or model_img_size(net)
    stages = sorted({s for s, _, _ in attention_layers(net)})
    unknown = sorted(set(args.stage or []) - set(stages))
    if unknown:
        raise UserError(f"--stage {' '.join(map(str, unknown))}: no such stage; allowed: {', '.join(map(str, stages))}")
    raw = torch.stack([load_image(p, size) for p in args.image])
    images = normalise(raw, mean, std)
    layers = select_layers(net, args.stage, args.all_blocks)
    if not layers:  # e.g. --model resnet18: nothing routes, nothing to draw
        raise UserError("the model has no attention layers to draw")
    records = record_layers(net, images, layers, keep_inputs=args.heat)
    if args.query:
        fitting = [r for r in records if set(args.query) <= set(nonempty_regions(r))]
        if not fitting:
            grids = ", ".join(f"stage {r.stage}: 0..{r.n_win ** 2 - 1}" for r in records)
            raise UserError(f"--query {' '.join(map(str, args.query))}: no drawn layer has these regions "
                            f"(row-major ids; {grids})")
        if len(fitting) < len(records):  # e.g. 12 exists in a 4x4 grid, not in a 2x2 one
            missing = sorted({r.stage for r in records} - {r.stage for r in fitting})
            print(f"note: --query regions missing in stage(s) {missing}: those layers show the default query "
                  f"regions", file=sys.stderr)
    modules = {(s, b): m for s, b, m in attention_layers(net)}
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, path in enumerate(args.image):
        for rec in records:
            h, w = rec.size
            qt = (min(int(args.query_point[0] * h), h - 1), min(int(args.query_point[1] * w), w - 1))
            heat = attention_weights(modules[rec.stage, rec.block], rec, qt, i).mean(0) if args.heat else None
            fig = routing_figure(raw[i], rec, args.query, qt, batch=i, heat=heat, mean=None, std=None)
            out = args.out / f"{path.stem}_stage{rec.stage}_block{rec.block}_{rec.kind}.png"
            fig.savefig(out)
            written.append(out)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse already printed usage / help
        return int(e.code or 0)
    for p in run(args):
        print(p)
    return 0
