"""`python cli.py report runs/<ablation> [--out DIR]`: the ablation's table, verdicts and plots (biformer_lit.report)."""
import sys
from typing import List, Optional

from . import CommandParser
from ..errors import folder_arg


def main(argv: Optional[List[str]] = None) -> int:
    parser = CommandParser(prog="cli.py report",
                           description="An ablation's TensorBoard logs -> report.md (table, verdicts) and plots.")
    parser.add_argument("ablation_dir", type=folder_arg, help="runs/<ablation> folder")
    parser.add_argument("--out", type=folder_arg, default=None, help="output folder (default: ablation_dir)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed usage / help
        return int(e.code or 0)
    from ..report import write_report
    path, text, notes = write_report(args.ablation_dir, args.out)
    print(text, end="")
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {path}")
    return 0
