"""Entry point: python cli.py {fit,validate,test,predict,report,visualize} ... (see docs/training.md)."""
import sys
from biformer_lit.cli import main
if __name__ == "__main__":
    sys.exit(main())
