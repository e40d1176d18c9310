"""fit / validate / test / predict: a LightningCLI over ClassificationModule + ImageDataModule.

The data decides num_classes and img_size (linked into the model, never typed twice). Trainer defaults
(TensorBoard under runs/, checkpoints: last + best val/top1, atomic checkpoint writes) are parser
defaults, so YAML and flags override them. The parser checks types, ranges and choices; `check_settings`
checks what it cannot (Trainer values Lightning takes unchecked, the seed), for a run and for every arm of
an ablation alike. `--ckpt_path` is resolved to a file and checked once, for every subcommand. A `fit`
config with ablation arms runs every arm instead (biformer_lit.ablation), each resolved by this parser.
"""
import argparse
import contextlib
import difflib
import glob
import logging
import math
import os
import sys
from typing import List, Optional

import yaml
from jsonargparse import get_loader, set_loader
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from . import runs
from .ablation.plan import Ablation
from .checkpoint import check_resume_checkpoint
from .data import ImageDataModule
from .errors import UserError, storage_oserror
from .module import ClassificationModule
from .reliability import EpochSeed, foreign_hpc_checkpoints, hpc_checkpoints
from .settings import Seed

TRAINER_DEFAULTS = {
    "max_epochs": 10,  # CPU-sized; ImageNet runs set 300 (docs/training.md)
    "log_every_n_steps": 10,
    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
               "init_args": {"save_dir": "runs", "name": "default", "default_hp_metric": False}},
    "plugins": {"class_path": "biformer_lit.checkpoint.AtomicCheckpointIO"},
}
# Two ModelCheckpoints: since Lightning 2.6 `save_last` only refreshes last.ckpt when a top-k checkpoint
# is saved at the same step (so with "best by val/top1" last.ckpt would be the best, not the latest).
# `checkpoint` keeps the best by val/top1; `last_checkpoint` (no monitor) rewrites last.ckpt at every
# validation, which is what `--ckpt_path last` resumes from.
CHECKPOINT_DEFAULTS = {"monitor": "val/top1", "mode": "max", "save_last": False, "save_top_k": 1,
                       "filename": "best-{epoch}", "auto_insert_metric_name": False}
LAST_CHECKPOINT_DEFAULTS = {"monitor": None, "save_top_k": 1, "save_last": False, "filename": "last",
                            "enable_version_counter": False}
YAML_MODE = "yaml_unique_keys"  # jsonargparse's YAML loading, with a key given twice refused


def _refuse_duplicate_keys(node, where: str = "") -> None:
    """A YAML mapping with a key twice: PyYAML keeps the last one silently."""
    if isinstance(node, yaml.MappingNode):
        keys = [k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode)]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise yaml.YAMLError(f"key {where}{twice[0]} is given twice (line {node.start_mark.line + 1}); "
                                 f"allowed: each key once")
        for k, v in node.value:
            _refuse_duplicate_keys(v, f"{where}{k.value}." if isinstance(k, yaml.ScalarNode) else where)
    elif isinstance(node, yaml.SequenceNode):
        for v in node.value:
            _refuse_duplicate_keys(v, where)


def _use_yaml_unique_keys() -> None:
    default = get_loader("yaml")

    def load(text: str):
        _refuse_duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader))
        return default(text)
    set_loader(YAML_MODE, load, exceptions=(yaml.YAMLError,))


class Parser(LightningArgumentParser):
    """On bad arguments: the error and a close match, not a hundred lines of usage first."""

    def print_usage(self, file=None) -> None:  # argparse calls it only on errors; --help prints help
        pass

    def error(self, message: str, ex: Optional[Exception] = None):
        super().error(message + _closest_option(getattr(ex, "subcommand_parser", None) or self, self.args or []), ex)

    def parse_path(self, path, *args, **kwargs):
        try:
            return super().parse_path(path, *args, **kwargs)
        except UnicodeDecodeError:  # e.g. a checkpoint given as --config: jsonargparse lets it escape
            self.error(f"config file {path} is not UTF-8 text; allowed: a YAML file")


def _closest_option(parser, argv: List[str]) -> str:
    """' (did you mean --x?)' for the first flag of argv that is no option of the parser (or of the subcommand
    argv names) nor a key under one."""
    parsers = [parser] + [a.choices[argv[0]] for a in parser._actions
                          if isinstance(a, argparse._SubParsersAction) and argv and argv[0] in a.choices]
    options = {o for p in parsers for a in p._actions for o in a.option_strings if o.startswith("--")}
    leaves = {o for o in options if not any(p.startswith(o + ".") for p in options)}  # --model: a group
    for arg in argv:
        key = arg.partition("=")[0]
        if key.startswith("--") and key not in options and not any(key.startswith(o + ".") for o in leaves):
            close = difflib.get_close_matches(key, options, n=1, cutoff=0.75)
            return f" (did you mean {close[0]}?)" if close else ""
    return ""


def check_settings(cfg) -> None:
    """What the parser leaves unchecked in a run's resolved config: Lightning's own Trainer values (0 ended in a
    ZeroDivisionError mid-run, a negative accumulation in a negative lr, a negative clip value turned clipping
    off silently) and the seed (LightningCLI types it as an int or a bool)."""
    seed = cfg.get("seed_everything")
    if not isinstance(seed, bool) and seed is not None:  # true / false: seed at random / not at all
        _typed("seed_everything", seed, Seed)
    trainer = cfg.get("trainer") or {}
    acc = trainer.get("accumulate_grad_batches")
    if isinstance(acc, int) and acc < 1:
        raise UserError(f"trainer.accumulate_grad_batches={acc!r}; allowed: an integer >= 1")
    clip = trainer.get("gradient_clip_val")
    if isinstance(clip, (int, float)) and not (math.isfinite(clip) and clip >= 0):
        raise UserError(f"trainer.gradient_clip_val={clip!r}; allowed: a finite number >= 0 (0 or null: no clipping)")
    every = trainer.get("val_check_interval")
    if isinstance(every, float) and not 0 < every <= 1 or isinstance(every, int) and every < 1:
        raise UserError(f"trainer.val_check_interval={every!r}; allowed: a fraction of the epoch in (0, 1], or a "
                        f"number of batches >= 1")


def _typed(name: str, value, kind) -> None:
    try:
        kind(value)
    except ValueError as e:
        raise UserError(f"{name}={value!r}; allowed: {kind.__name__} ({e})") from None


def _tensorboard_args(logger):
    """The init_args of a TensorBoardLogger in the config; None for another logger (or none)."""
    if not hasattr(logger, "get") or not str(logger.get("class_path", "")).endswith("TensorBoardLogger"):
        return None
    return logger.init_args


def _log_folder(args) -> str:
    return os.path.join(args.save_dir, args.get("name") or "")


def _run_folders(cfg) -> Optional[List[str]]:
    """The run folders `--ckpt_path last` can mean, newest first: the last_checkpoint's fixed folder, the logger's
    pinned version, or every <save_dir>/<name>/version_N; None for another logger (Lightning's own lookup)."""
    if cfg.get("last_checkpoint") and cfg.last_checkpoint.get("dirpath"):
        return [os.path.abspath(cfg.last_checkpoint.dirpath)]
    args = _tensorboard_args(cfg.trainer.get("logger"))
    if args is None:
        return None
    version = args.get("version")
    if version is not None:
        return [os.path.join(_log_folder(args), version if isinstance(version, str) else f"version_{version}")]
    return [run for _, run in runs.versions(_log_folder(args))]


def _last_in(folder: str) -> Optional[str]:
    """last.ckpt of a run folder, or of a checkpoint folder given as last_checkpoint.dirpath."""
    return runs.last_checkpoint(folder) or (os.path.join(folder, "last.ckpt")
                                            if os.path.isfile(os.path.join(folder, "last.ckpt")) else None)


def resolve_ckpt_path(subcommand: str, cfg) -> None:
    """`--ckpt_path` to a checked file (or None), for every subcommand alike: `last` is the newest last.ckpt of
    this logger's runs (a `fit` finding none starts a new run); a file must be a readable Lightning checkpoint.
    Lightning would read it next with a bare torch.load (a traceback for a corrupt file), and on its own resolve
    `last` only in the new run's empty version folder."""
    path = cfg.get("ckpt_path")
    if path is None:
        return
    allowed = "allowed: a checkpoint file, or last (the run's newest last.ckpt)"
    if not str(path).strip():  # e.g. --ckpt_path=$CKPT with CKPT unset
        raise UserError(f"--ckpt_path is empty; {allowed}")
    if path == "best":
        folders = _run_folders(cfg) or []
        kept = next((f for run in folders if (f := sorted(set(glob.glob(os.path.join(glob.escape(run), "checkpoints",
                                                                                       "*.ckpt")))
                                                          - {os.path.join(run, "checkpoints", "last.ckpt")}))), [])
        raise UserError(f"--ckpt_path best: a new {subcommand} run does not know the best checkpoint of an earlier one; "
                        f"pass the file, e.g. " + (", ".join(kept) if kept else "RUN/checkpoints/best-N.ckpt"))
    if path == "hpc":
        if not hpc_checkpoints(cfg.trainer.get("default_root_dir")):
            raise UserError(f"--ckpt_path hpc: no hpc_ckpt_*.ckpt in {cfg.trainer.get('default_root_dir') or os.getcwd()}"
                            f"; {allowed}")
        return
    if path == "last":
        folders = _run_folders(cfg)
        if folders is None:
            return  # another logger: Lightning's own lookup
        found = next((last for run in folders if (last := _last_in(run))), None)
        if found is None and subcommand == "fit":  # a SLURM script's first start: a new run
            print("note: --ckpt_path last: no last.ckpt yet, starting a new run", file=sys.stderr)
            cfg.ckpt_path = None
            return
        if found is None:
            raise UserError(f"--ckpt_path last: no checkpoints/last.ckpt in {', '.join(folders) or 'the logger folder'}"
                            f"; pass the file, e.g. --ckpt_path RUN/checkpoints/last.ckpt")
        cfg.ckpt_path = path = found
    if os.path.isdir(path):
        raise UserError(f"--ckpt_path {path} is a folder; {allowed}, e.g. {os.path.join(path, 'last.ckpt')}")
    ckpt = check_resume_checkpoint(path, weights_only=cfg.get("weights_only") is not False)
    if subcommand != "fit":
        _warn_other_data(path, ckpt.get("datamodule_hyper_parameters") or {}, cfg.get("data"))


def _warn_other_data(path: str, trained: dict, data_cfg) -> None:
    """Lightning restores the model's settings from a checkpoint, not the data's: evaluating at another
    img_size or on other data than the run was trained on would pass silently."""
    keys = ("dataset", "root", "img_size", "num_classes", "difficulty", "seed", "val_size")
    now = data_cfg or {}
    differ = [f"data.{k}={trained[k]!r} (now {now.get(k)!r})" for k in keys  # None now: derived from the data
              if trained.get(k) is not None and now.get(k) is not None and trained[k] != now.get(k)]
    if differ:
        print(f"warning: {path} was trained with {', '.join(differ)}; pass those --data.* settings to evaluate "
              f"on the data it was trained for", file=sys.stderr)


def _finished(ckpt_path: str, trainer) -> Optional[str]:
    """What says that the checkpoint's run has nothing left to train under these trainer settings, or None."""
    from .checkpoint import load_checkpoint_file
    ckpt = load_checkpoint_file(ckpt_path, mmap=True)
    loop = ckpt.get("loops", {}).get("fit_loop", {})
    epochs = loop.get("epoch_progress", {}).get("current", {}).get("processed", 0)  # trained; validated below
    validating = loop.get("epoch_loop.val_loop.batch_progress", {}).get("current", {})
    if validating.get("completed") != validating.get("ready"):  # stopped inside a validation: it resumes there
        return None
    if trainer.max_steps is not None and 0 <= trainer.max_steps <= ckpt.get("global_step", 0):
        return f"reached max_steps={trainer.max_steps}; to train on, pass a larger --trainer.max_steps"
    if trainer.max_epochs is not None and 0 <= trainer.max_epochs <= epochs:
        return f"trained {epochs} of max_epochs={trainer.max_epochs}; to train on, pass a larger --trainer.max_epochs"
    return None


class BiFormerCLI(LightningCLI):
    ablation: Optional[dict] = None  # the section, when this `fit` runs an ablation instead of a run
    exit_code = 0

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({f"checkpoint.{k}": v for k, v in CHECKPOINT_DEFAULTS.items()})
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        parser.set_defaults({f"last_checkpoint.{k}": v for k, v in LAST_CHECKPOINT_DEFAULTS.items()})
        parser.add_lightning_class_args(EpochSeed, "epoch_seed")  # --epoch_seed.enabled false: no reseeding
        parser.add_class_arguments(Ablation, "ablation", instantiate=False)
        # num_classes may come from the files (imagefolder): read it from the built data module
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.img_size", "model.img_size")

    def parse_arguments(self, parser, args) -> None:
        self.config = parser.parse_args(args)  # (LightningCLI's own warns when args are given in-process)
        subcommand = self.config.get("subcommand")
        cfg = self.config[subcommand] if subcommand else self.config  # run=False: no subcommand
        section = cfg.ablation.as_dict()
        if section["arms"]:
            if subcommand != "fit":
                raise UserError(f"an ablation section runs with fit, not {subcommand}: evaluate one arm with its run "
                                f"folder's config.yaml (runs/<ablation>/<arm>/seed_<n>/config.yaml)")
            self.ablation = section
            return
        if section != self._parser(subcommand).get_defaults().ablation.as_dict():
            raise UserError("--ablation.* given, but no config has ablation arms")
        check_settings(cfg)
        resolve_ckpt_path(subcommand, cfg)

    def _set_seed(self) -> None:
        if self.ablation is None:  # each arm seeds its own process
            super()._set_seed()

    def before_instantiate_classes(self) -> None:
        if self.ablation is not None:
            return
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        logger = _tensorboard_args(cfg.trainer.get("logger"))
        if cfg.get("ckpt_path") is None:
            found = foreign_hpc_checkpoints(cfg.trainer.get("default_root_dir"))
            if found:
                raise UserError(f"{found[-1]} in {cfg.trainer.get('default_root_dir') or os.getcwd()}: under SLURM "
                                "Lightning would silently resume this run from it (runs here save last.ckpt instead). "
                                "Resume with --ckpt_path last or a file, or move the hpc_ckpt files away")
        elif logger is not None and os.path.isfile(cfg.ckpt_path):
            # a checkpoint of <save_dir>/<name>/version_N: continue (fit) or evaluate into that run's folder, not
            # a new version (fit's curves would split in two; every evaluation made another folder)
            if logger.get("version") is None:
                logger.version = runs.version_of(cfg.ckpt_path, _log_folder(logger))
            if self.subcommand in ("validate", "test", "predict") and logger.get("version") is not None and not logger.get("sub_dir"):
                logger.sub_dir = self.subcommand  # beside the run's own logs and config.yaml, not over them

    def instantiate_classes(self) -> None:
        if self.ablation is None:  # an ablation's arms are built in their own processes
            super().instantiate_classes()

    def instantiate_trainer(self, **kwargs):
        # quiet while the Trainer starts: Lightning's notices there (device availability, a product tip) are
        # not the run's business; warnings still show
        notices = logging.getLogger("lightning.pytorch.utilities.rank_zero")
        level = notices.level
        notices.setLevel(logging.WARNING)
        try:
            return super().instantiate_trainer(**kwargs)
        except RuntimeError as e:
            # Trainer() checks its environment, e.g. SLURM variables left set outside a job step
            # (SLURM_NTASKS=2 without srun): the user's to fix; our callbacks and plugins are built before this
            from lightning.fabric.plugins.environments import SLURMEnvironment
            slurm = sorted(k for k in os.environ if k.startswith("SLURM_")) if SLURMEnvironment.detect() else []
            where = f" (SLURM variables are set here: {', '.join(slurm[:4])}{' ...' if len(slurm) > 4 else ''}; " \
                    f"outside a SLURM job step, unset them)" if slurm else ""
            raise UserError(f"the trainer cannot start: {e}{where}") from e
        finally:
            notices.setLevel(level)

    def after_instantiate_classes(self) -> None:
        if self.ablation is not None:
            return
        # Lightning merges model and data hparams for the logger and rejects a key with two values:
        # record the data's resolved num_classes (None = "derive it") as the value the model got.
        # (hparams_initial, the copy Lightning compares and logs, is only kept privately)
        dm = self.datamodule
        for hp in (getattr(dm, "hparams", None), getattr(dm, "_hparams_initial", None)):
            if hp is not None and "num_classes" in hp and hp["num_classes"] is None:
                hp["num_classes"] = dm.num_classes

    def _run_subcommand(self, subcommand: str) -> None:
        if self.ablation is not None:
            from .ablation import run_ablation
            base = self.config.fit
            from_files = self._parser("fit").parse_args(["--config=" + str(c) for c in base.get("config") or []])
            self.exit_code = run_ablation(self.ablation, self._as_dict(base), self._as_dict(from_files),
                                          self.resolve_arm)
            return
        super()._run_subcommand(subcommand)

    def _as_dict(self, cfg) -> dict:
        return yaml.safe_load(self._parser("fit").dump(cfg)) or {}

    def resolve_arm(self, config: dict, build: bool):
        """An ablation run's config (a dict) through `fit`'s parser: (resolved dict, its YAML). build: also build
        its data module and model on the CPU and drop them, so their constructors check the values."""
        parser = self._parser("fit")
        with _raising(parser):
            cfg = parser.parse_object(config)
        check_settings(cfg)
        if build:
            data = ImageDataModule(**cfg.data)
            try:
                classes = data.num_classes
            except UserError:  # no data here (e.g. a dry run elsewhere): the arm's run says so; check the model
                classes = 2
            ClassificationModule(**dict(cfg.model, num_classes=classes, img_size=data.img_size))
        text = parser.dump(cfg)
        return yaml.safe_load(text), text

    # --- per subcommand ----------------------------------------------------------------------------
    def _last_checkpoints(self) -> List[str]:
        """The last*.ckpt files in this run's checkpoint folder, found as Lightning finds `--ckpt_path last`."""
        return sorted({p for cb in self.trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)
                       for p in cb._find_last_checkpoints(self.trainer)})

    def fit(self, model, datamodule=None, ckpt_path=None, **kwargs) -> None:
        if ckpt_path is not None and os.path.isfile(ckpt_path):
            finished = _finished(ckpt_path, self.trainer)
            if finished:
                print(f"note: {ckpt_path}: the run is finished ({finished})", file=sys.stderr)
                return
        # A new run into a fixed checkpoint folder (the logger's version set, as in an ablation arm's config.yaml;
        # --last_checkpoint.dirpath; no logger) that holds a run's last.ckpt would overwrite it (Lightning only
        # warns) and append a second curve to that run's event files
        found = self._last_checkpoints() if ckpt_path is None else []
        if found:
            raise UserError(f"{found[0]} holds an earlier run's last checkpoint, which this fit would overwrite: "
                            f"continue that run with --ckpt_path last, or log this one elsewhere (another "
                            f"--trainer.logger.init_args.version or save_dir)")
        folder = self.trainer.log_dir if self.trainer.loggers else os.path.join(self.trainer.default_root_dir,
                                                                                 "checkpoints")
        try:
            with contextlib.ExitStack() as claim:
                if self.trainer.is_global_zero:  # DDP's other processes run in the same folder
                    claim.enter_context(runs.claim(folder))
                self.trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, **kwargs)
        except (OSError, RuntimeError) as e:
            full = storage_oserror(e)
            if full is None or full.filename:
                raise
            # a write that names no file (Lightning's config.yaml / hparams.yaml): name the run's folder, and
            # leave no empty record there (hparams.yaml is only ever written when missing)
            for name in ("hparams.yaml", "config.yaml"):
                record = os.path.join(folder, name)
                if os.path.isfile(record) and os.path.getsize(record) == 0:
                    os.remove(record)
            raise OSError(full.errno, f"{full.strerror} (writing the run's files)", folder) from e

    def _before_evaluating(self) -> None:
        cfg = self.config_init[self.subcommand]
        if cfg.get("ckpt_path") is None and not self.model.hparams.get("init_from"):  # Lightning says nothing
            print(f"warning: {self.subcommand} without --ckpt_path or --model.init_from: the untrained (randomly "
                  f"initialised) model is evaluated", file=sys.stderr)

    before_validate = before_test = before_predict = _before_evaluating


@contextlib.contextmanager
def _raising(parser):
    """Parser errors as UserError (for an ablation's arms: one message, no exit)."""
    before, parser.exit_on_error = parser.exit_on_error, False
    try:
        yield
    except argparse.ArgumentError as e:
        raise UserError(" ".join(line.strip() for line in str(e).splitlines())) from None
    finally:
        parser.exit_on_error = before


def make_cli(args: Optional[List[str]] = None, run: bool = True) -> BiFormerCLI:
    """The LightningCLI (args=None: sys.argv). run=False builds model, data and trainer only (tests, notebooks)."""
    _use_yaml_unique_keys()
    return BiFormerCLI(ClassificationModule, ImageDataModule, subclass_mode_model=False, subclass_mode_data=False,
                       parser_class=Parser, parser_kwargs={"allow_abbrev": False, "parser_mode": YAML_MODE},
                       trainer_defaults=TRAINER_DEFAULTS, save_config_kwargs={"overwrite": True},
                       auto_configure_optimizers=False,  # the module's recipe owns the optimizer and schedule
                       args=args, run=run)


def run(argv: List[str], from_sys: bool = False) -> int:
    """A training command (argv starts with fit / validate / test / predict); the exit status."""
    try:
        return make_cli(None if from_sys else argv).exit_code
    except SIGTERMException:
        # Lightning stopped after the batch in flight; PreemptionCheckpoint saved last.ckpt
        print("interrupted by SIGTERM: last.ckpt saved; run the same command with --ckpt_path last to continue",
              file=sys.stderr)
        return 143
    except MisconfigurationException as e:  # Lightning's own word for a setting it refuses
        raise UserError(str(e)) from e
