"""The commands besides training (`cli.py report | visualize | export`): each a module with main(argv) -> int."""
import argparse

from ..errors import UserError


class CommandParser(argparse.ArgumentParser):
    """argparse whose mistakes are UserErrors (one `error:` line from the CLI, no usage dump); --help as usual."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message}")
