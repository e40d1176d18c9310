"""Command line: `python cli.py COMMAND ...` or `biformer-lit COMMAND ...`.

fit / validate / test / predict run the LightningCLI (biformer_lit.lightning_cli); report, visualize and
export are small commands of their own (biformer_lit.commands). Each is imported only when asked for, so
help and mistakes answer at once. Bad input anywhere raises UserError: caught here, once, and printed as
`error: <message>` with exit status 2; a full or read-only disk likewise; anything else is a bug and keeps
its traceback.
"""
import importlib
import sys
from typing import List, Optional

from .errors import UserError, storage_error

TRAINING = ("fit", "validate", "test", "predict")
COMMANDS = {"report": "biformer_lit.commands.report", "visualize": "biformer_lit.commands.visualize",
            "export": "biformer_lit.commands.export"}
HELP = """usage: cli.py COMMAND [options]

Train and study BiFormer and its relatives (see README.md).

commands:
  fit         train; a config with an `ablation:` section runs every arm (experiments/*_ablation.yaml)
  validate    evaluate a checkpoint on the validation split
  test        evaluate a checkpoint on the test split
  predict     write predictions.csv for the test split
  report      an ablation's table, verdicts and plots: cli.py report runs/<ablation>
  visualize   routing pictures of a checkpoint or released weights
  export      a checkpoint or model to ONNX / torch.export, checked against eager

`cli.py COMMAND --help` lists a command's options."""


def message(e: UserError) -> str:
    """The error's own message. One raised in a DataLoader worker arrives with the worker's traceback in front,
    ending in `<module>.<class>: <message>`."""
    text = str(e).strip()
    return text.rsplit(f"{type(e).__module__}.{type(e).__qualname__}: ", 1)[-1]


def main(argv: Optional[List[str]] = None) -> int:
    """Run one command; returns the exit status (0; 2 for bad input)."""
    from_sys = argv is None  # LightningCLI reads sys.argv itself then
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else None
    try:
        if command in TRAINING:
            from .lightning_cli import run
            return run(argv, from_sys)
        if command in COMMANDS:
            return importlib.import_module(COMMANDS[command]).main(argv[1:])
        print(HELP, file=sys.stdout if command in (None, "-h", "--help") else sys.stderr)
        if command in (None, "-h", "--help"):
            return 0
        print(f"error: unknown command {command!r}; allowed: {', '.join([*TRAINING, *COMMANDS])}", file=sys.stderr)
        return 2
    except SystemExit as e:  # a parser's --help, or its own error line: its status (for in-process callers)
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    except UserError as e:
        print(f"error: {message(e)}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as e:  # torch.save wraps a full disk's OSError in a RuntimeError
        found = storage_error(e)
        if found is None:
            raise
        print(f"error: {found}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
