"""Types of the settings that have a range: the command line's parser checks them (one home per rule), and
its error names the key, the value and the range. Light: no torch here.
"""
import math

from jsonargparse.typing import ClosedUnitInterval as Unit  # [0, 1]
from jsonargparse.typing import OpenUnitInterval as UnitOpen  # (0, 1)
from jsonargparse.typing import restricted_number_type

__all__ = ["SEED_MAX", "Seed", "PositiveFinite", "NonNegativeFinite", "Unit", "UnitOpen", "UnitRightOpen"]

SEED_MAX = 2**32 - 1  # seed_everything's range (numpy's); torch's generators take it too
Seed = restricted_number_type("Seed", int, [(">=", 0), ("<=", SEED_MAX)])

# finite numbers: a YAML `.inf` passes every lower bound (eps=inf zeroed the Adam step)
PositiveFinite = restricted_number_type("PositiveFinite", float, [(">", 0), ("<", math.inf)])
NonNegativeFinite = restricted_number_type("NonNegativeFinite", float, [(">=", 0), ("<", math.inf)])
UnitRightOpen = restricted_number_type("UnitRightOpen", float, [(">=", 0), ("<", 1)])  # [0, 1)


def plain(value):
    """A parsed setting as the plain Python value it stands for: the parser hands constructors instances of the
    types above (subclasses of int, float, str), which must not reach a checkpoint's hyperparameters (the safe
    loader refuses unknown classes) or a YAML file."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value) if type(value) in (list, tuple) else [plain(v) for v in value]
    for kind in (bool, int, float, str):
        if isinstance(value, kind):
            return kind(value)
    return value
