"""Planning an ablation: the typed `ablation:` section, the arms it selects, and each run's `fit` config.

The section is a group of `fit`'s own parser (types checked there: `--ablation.seeds=[0,1,2]` like any flag);
what a type cannot say (unique names, an arm that exists) is checked in Ablation.__post_init__. An arm's
config is the resolved `fit` config with the arm's overrides (dotted keys) set into it, then its seed,
logger and callbacks; the caller resolves it through the same parser.
"""
import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from jsonargparse.typing import NonNegativeInt, PositiveInt

from ..errors import UserError
from ..settings import Seed

try:  # Python 3.11
    from typing import NotRequired, TypedDict
except ImportError:  # Python 3.10
    from typing_extensions import NotRequired, TypedDict


# Union[int, str], never Union[str, int]: typing caches a union whatever its order, and jsonargparse tries its
# members in order, so one written str-first here would make Lightning's logger version ('0') text elsewhere.
class Arm(TypedDict):
    """name: its folder (runs/<ablation>/<name>/seed_<n>); overrides: dotted keys of the fit config."""
    name: Union[int, str]
    overrides: NotRequired[Dict[str, Any]]


def _folder_name(key: str, value) -> str:
    value = str(value)
    if not value.strip() or "/" in value or value in (".", ".."):
        raise UserError(f"{key}={value!r}; allowed: a folder name (no '/')")
    return value


@dataclass
class Ablation:
    """The `ablation:` section of a fit config. No arms: a plain fit.

    name: runs/<name>/...; arms: each a name and its overrides; seeds: seed_everything of each replicate;
    reference: the arm every other is compared with (default: the first); parallel: runs at once (on CUDA
    machines run i gets GPU i % n_gpus); visualize: routing pictures in TensorBoard; runs_dir: where runs/
    is; only / index: run these arms only (by name; by position, e.g. $SLURM_ARRAY_TASK_ID); dry_run: say
    what would run.
    """
    name: Union[int, str] = "ablation"
    arms: List[Arm] = field(default_factory=list)
    seeds: List[Seed] = field(default_factory=lambda: [0])
    reference: Optional[Union[int, str]] = None
    parallel: PositiveInt = 1
    visualize: bool = True
    runs_dir: str = "runs"
    only: Optional[Union[int, str, List[Union[int, str]]]] = None
    index: Optional[NonNegativeInt] = None
    dry_run: bool = False

    def __post_init__(self):
        self.name = _folder_name("ablation.name", self.name)
        self.arms = [dict(name=_folder_name(f"ablation.arms[{i}].name", a["name"]), overrides=a.get("overrides") or {})
                     for i, a in enumerate(self.arms)]
        names = [a["name"] for a in self.arms]
        if not names:
            raise UserError("ablation.arms=[]; allowed: a list of {name: ..., overrides: {dotted.key: value}}")
        if len(set(names)) != len(names):
            raise UserError(f"ablation.arms: names {names}; allowed: unique names")
        if len(set(self.seeds)) != len(self.seeds) or not self.seeds:  # both would run in one seed_<n> folder
            raise UserError(f"ablation.seeds={self.seeds}; allowed: distinct integers")
        if not str(self.runs_dir).strip():
            raise UserError("ablation.runs_dir is empty; allowed: a folder path")
        for key, wanted in (("reference", self.reference), ("only", self.only)):
            for w in wanted if isinstance(wanted, list) else [] if wanted is None else [wanted]:
                if str(w) not in names:
                    raise UserError(f"ablation.{key}={w!r}: no such arm; arms: {', '.join(names)}")
        if self.only == []:
            raise UserError(f"ablation.only=[]; allowed: an arm name or a list of them; arms: {', '.join(names)}")
        if self.only is not None and self.index is not None:
            raise UserError("give ablation.only or ablation.index, not both")
        if self.index is not None and self.index >= len(names):
            raise UserError(f"ablation.index={self.index}; allowed: an integer in 0..{len(names) - 1} "
                            f"({len(names)} arms)")
        self.reference = str(self.reference) if self.reference is not None else names[0]

    @property
    def selected(self) -> List[dict]:
        """The arms this invocation runs, each with its position in the section."""
        arms = [dict(a, index=i) for i, a in enumerate(self.arms)]
        if self.index is not None:
            return [arms[self.index]]
        if self.only is not None:
            wanted = {str(w) for w in (self.only if isinstance(self.only, list) else [self.only])}
            return [a for a in arms if a["name"] in wanted]
        return arms

    def run_dir(self, arm: str, seed: int) -> Path:
        return Path(self.runs_dir) / self.name / arm / f"seed_{seed}"


def set_dotted(cfg: dict, dotted: str, value) -> None:
    node = cfg
    *path, last = dotted.split(".")
    for part in path:
        if not isinstance(node.get(part, {}), dict):
            raise UserError(f"override {dotted!r}: {part!r} is not a section")
        node = node.setdefault(part, {})
    node[last] = copy.deepcopy(value)


def lookup(cfg, dotted: str):
    """The value at a dotted key (None where there is none)."""
    for part in dotted.split("."):
        cfg = cfg.get(part) if isinstance(cfg, dict) else None
    return cfg


def leaves(prefix: str, value) -> List[str]:
    """Dotted keys of an override's values: a mapping value sets each of its keys."""
    if isinstance(value, dict) and value:
        return [leaf for k, v in value.items() for leaf in leaves(f"{prefix}.{k}", v)]
    return [prefix]


def changed_keys(before, after, prefix: str = "") -> List[str]:
    """Dotted keys whose values differ between two configs (an unset mapping counts as an empty one)."""
    if isinstance(before, dict) and after is None or isinstance(after, dict) and before is None:
        before, after = before or {}, after or {}
    if not (isinstance(before, dict) and isinstance(after, dict)):
        return [] if before == after else [prefix.rstrip(".")]
    return [key for k in sorted(set(before) | set(after), key=str)
            for key in changed_keys(before.get(k), after.get(k), f"{prefix}{k}.")]


ABLATION_SETS = ("seed_everything", "trainer.logger")  # what the runner sets in every arm's config


def check_flags(ablation: Ablation, from_files: dict, resolved: dict) -> None:
    """A flag given to every arm must not set what an arm or the runner sets: the arm's value would silently
    win over it. from_files / resolved: the fit config without / with the command line's flags."""
    flagged = [k for k in changed_keys(from_files, resolved) if not k.startswith(("ablation.", "ckpt_path"))]
    for arm in ablation.selected:
        for key in [leaf for k, v in arm["overrides"].items() for leaf in leaves(k, v)] + list(ABLATION_SETS):
            clash = [f for f in flagged if f == key or f.startswith(key + ".") or key.startswith(f + ".")]
            if clash:
                owner = f"arm {arm['name']}" if key not in ABLATION_SETS else "the ablation (seeds, run folders)"
                raise UserError(f"--{clash[0]} is set by {owner}, which would override it; change it in the "
                                f"ablation section instead (no run started)")


def arm_config(base: dict, arm: dict, seed: int, run_dir: Path, visualize: bool) -> dict:
    """One run's fit config (unresolved): the base with the arm's overrides, its seed, logger and callbacks."""
    cfg = copy.deepcopy(base)
    for key in ("ablation", "config", "ckpt_path"):
        cfg.pop(key, None)
    for key, value in arm["overrides"].items():  # a mapping value sets each of its keys
        for leaf in leaves(key, value):
            set_dotted(cfg, leaf, lookup(value, leaf[len(key) + 1:]) if leaf != key else value)
    cfg["seed_everything"] = seed
    trainer = cfg.setdefault("trainer", {})
    trainer["logger"] = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                         "init_args": {"save_dir": str(run_dir.parent.parent), "name": arm["name"],
                                       "version": run_dir.name, "default_hp_metric": False}}
    callbacks = list(trainer.get("callbacks") or [])
    callbacks.append({"class_path": "biformer_lit.callbacks.RunStats",
                      "init_args": {"knobs": dict(arm["overrides"], arm=arm["name"], seed=seed)}})
    if visualize:
        callbacks.append({"class_path": "biformer_lit.callbacks.RoutingVisualizer"})
    trainer["callbacks"] = callbacks
    return cfg
