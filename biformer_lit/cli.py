"""Command line: `python cli.py {fit,validate,test,predict} [--config a.yaml --config b.yaml] [--key value]`,
plus `report` and `visualize` (their own parsers).

LightningCLI over ClassificationModule + ImageDataModule. The data decides num_classes and img_size
(linked into the model, never typed twice). Trainer defaults (TensorBoard under runs/, checkpoints:
last + best val/top1, atomic checkpoint writes) are parser defaults, so YAML and flags override them.
Bad input (data, checkpoints, model settings) ends with `error: <message>` and exit status 2;
other exceptions are bugs and keep their traceback.
"""
import difflib
import glob
import inspect
import math
import os
import re
import sys
from typing import List, Optional, Tuple

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .checkpoint import CheckpointError, check_resume_checkpoint
from .errors import report_storage_error
from .module import ClassificationModule, NonFiniteLossError
from .reliability import check_seed, foreign_hpc_checkpoints, hpc_checkpoints

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


VERSION_DIR = re.compile(r"version_(\d+)")  # TensorBoardLogger's run folders

MORE_COMMANDS = ("Two more commands have their own options: `cli.py report RUNS_DIR` (an ablation's table and "
                 "plots; see `cli.py report --help`) and `cli.py visualize` (routing pictures; see "
                 "`cli.py visualize --help`).")


class ConfigError(ValueError):
    """A model/data/trainer setting rejected while building the objects (user input)."""


def _data_error():
    from .data import DataError  # the data package imports torchvision: only when needed
    return DataError


def _user_errors() -> tuple:
    return (_data_error(), CheckpointError, ConfigError, FileNotFoundError, NotADirectoryError,
            MisconfigurationException, NonFiniteLossError)


class ShortErrorParser(LightningArgumentParser):
    """On bad arguments: the error and a close match, not a hundred lines of usage first."""

    def print_usage(self, file=None) -> None:  # argparse calls it only on errors; --help prints help
        pass

    def error(self, message: str, ex: Optional[Exception] = None):
        parser = getattr(ex, "subcommand_parser", None) or self
        wrong = re.findall(r"(?:unrecognized arguments: |does not accept option ')(--)?([\w.]+)", message)
        if wrong:
            options = {o.lstrip("-") for a in parser._actions for o in a.option_strings if o.startswith("--")}
            close = difflib.get_close_matches(wrong[0][1], options, n=1, cutoff=0.75)
            if close:
                message += f" (did you mean --{close[0]}?)"
        super().error(message, ex)

    def parse_path(self, path, *args, **kwargs):
        """--config FILE (validate / test / predict; fit's files are read first by the ablation hook)."""
        try:
            return super().parse_path(path, *args, **kwargs)
        except UnicodeDecodeError:  # e.g. a checkpoint given as --config: jsonargparse lets it escape
            from .ablation import NOT_TEXT
            self.error(f"config file {path} is not a text file ({NOT_TEXT})")


class BiFormerCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({f"checkpoint.{k}": v for k, v in CHECKPOINT_DEFAULTS.items()})
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        parser.set_defaults({f"last_checkpoint.{k}": v for k, v in LAST_CHECKPOINT_DEFAULTS.items()})
        # num_classes may come from the files (imagefolder): read it from the built data module
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.img_size", "model.img_size")

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        # Lightning reads --ckpt_path FILE next (for its hyperparameters) with a bare torch.load: check the
        # file first, so a corrupt, truncated or foreign file is a one-line error, not a traceback
        cfg = self.config.get(self.config.get("subcommand") or "", {})
        path = cfg.get("ckpt_path") if hasattr(cfg, "get") else None
        seed = cfg.get("seed_everything") if hasattr(cfg, "get") else None
        if not isinstance(seed, bool) and seed is not None:  # true / false: seed at random / not at all
            check_seed("seed_everything", seed, ConfigError)
        if hasattr(cfg, "get") and cfg.get("trainer") is not None:
            _check_trainer(cfg.trainer)
        if path in ("last", "best"):
            found = _named_checkpoint(self.config.get("subcommand"), path, cfg)
            if found:
                cfg.ckpt_path = path = found
        if path is not None:
            _check_ckpt_path(path, cfg.trainer.get("default_root_dir"))
        if path and os.path.isfile(path):
            ckpt = check_resume_checkpoint(path, weights_only=cfg.get("weights_only") is not False)
            if self.config.get("subcommand") in ("validate", "test", "predict"):
                _warn_other_data(path, ckpt.get("datamodule_hyper_parameters") or {}, cfg.get("data"))

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(self.subcommand) if self.subcommand else None
        if cfg is None:
            return
        if cfg.get("ckpt_path") is None:
            _refuse_foreign_hpc_checkpoints(cfg.trainer.get("default_root_dir"))
        elif self.subcommand == "fit" and not cfg.last_checkpoint.get("dirpath"):
            _continue_logger_version(cfg.trainer.get("logger"), cfg.ckpt_path)

    def _last_checkpoints(self) -> List[str]:
        """The last*.ckpt files in this run's checkpoint folder, found as Lightning finds `--ckpt_path last`."""
        return sorted({p for cb in self.trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)
                       for p in cb._find_last_checkpoints(self.trainer)})

    def before_fit(self) -> None:
        # A new run into a fixed checkpoint folder (the logger's version set, as in an ablation arm's
        # config.yaml; --last_checkpoint.dirpath; no logger) that holds a run's last.ckpt would overwrite it
        # (Lightning only warns) and append a second curve to that run's event files
        found = self._last_checkpoints() if self.config_init.fit.get("ckpt_path") is None else []
        if found:
            raise ConfigError(f"{found[0]} holds an earlier run's last checkpoint, which this fit would overwrite: "
                              f"continue that run with --ckpt_path last, or log this one elsewhere (another "
                              f"--trainer.logger.init_args.version or save_dir)")

    def _before_evaluating(self) -> None:
        cfg = self.config_init[self.subcommand]
        if cfg.get("ckpt_path") is None and not self.model.hparams.get("init_from"):  # Lightning says nothing
            print(f"warning: {self.subcommand} without --ckpt_path or --model.init_from: the untrained (randomly "
                  f"initialised) model is evaluated", file=sys.stderr)
        # Lightning's `last` looks in this run's new version folder, which holds no checkpoint: it would
        # evaluate the untrained model after a warning (fit starts a fresh run instead: documented, kept)
        if cfg.get("ckpt_path") == "last" and not self._last_checkpoints():
            raise ConfigError(f"--ckpt_path last: this {self.subcommand} run's checkpoint folder holds no last.ckpt "
                              f"(it is a new logger version unless the logger's version is set), so the untrained "
                              f"model would be evaluated; give the file, e.g. "
                              f"runs/<name>/version_N/checkpoints/last.ckpt")

    before_validate = before_test = before_predict = _before_evaluating

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except _user_errors():
            raise
        except ValueError as e:
            # raised while building model/data/trainer from the config, e.g. BiFormer's topk out of
            # range: a setting to fix, not a bug (a traceback would only hide the message)
            raise ConfigError(str(e)) from e
        except TypeError as e:
            if "unexpected keyword argument" not in str(e):  # e.g. a typo in model_kwargs; else a bug
                raise
            raise ConfigError(_with_allowed_kwargs(str(e))) from e

    def instantiate_trainer(self, **kwargs):
        try:
            return super().instantiate_trainer(**kwargs)
        except RuntimeError as e:
            # Trainer() checks its environment, e.g. SLURM variables left set outside a job step
            # (SLURM_NTASKS=2 without srun): the user's to fix; our callbacks and plugins are built before this
            from lightning.fabric.plugins.environments import SLURMEnvironment
            slurm = sorted(k for k in os.environ if k.startswith("SLURM_")) if SLURMEnvironment.detect() else []
            where = f" (SLURM variables are set here: {', '.join(slurm[:4])}{' ...' if len(slurm) > 4 else ''}; " \
                    f"outside a SLURM job step, unset them)" if slurm else ""
            raise ConfigError(f"the trainer cannot start: {e}{where}") from e

    def after_instantiate_classes(self) -> None:
        # Lightning merges model and data hparams for the logger and rejects a key with two values:
        # record the data's resolved num_classes (None = "derive it") as the value the model got.
        # (hparams_initial, the copy Lightning compares and logs, is only kept privately)
        dm = self.datamodule
        for hp in (getattr(dm, "hparams", None), getattr(dm, "_hparams_initial", None)):
            if hp is not None and "num_classes" in hp and hp["num_classes"] is None:
                hp["num_classes"] = dm.num_classes


def _with_allowed_kwargs(message: str) -> str:
    """A model_kwargs typo for BiFormer: add the closest accepted name and the whole list."""
    found = re.search(r"BiFormer\.__init__\(\) got an unexpected keyword argument '(\w+)'", message)
    if not found:
        return message
    from .models import BiFormer
    allowed = [p for p in inspect.signature(BiFormer.__init__).parameters if p != "self"]
    close = difflib.get_close_matches(found.group(1), allowed, n=1)
    return (f"model_kwargs: BiFormer takes no {found.group(1)!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
            + f"; allowed: {', '.join(allowed)}")


def _check_trainer(trainer) -> None:
    """Trainer settings Lightning takes unchecked: 0 ended in a ZeroDivisionError traceback mid-run, a negative
    accumulation in a negative lr (AdamW's traceback), a negative clip value turned clipping off silently."""
    def bad(key, value, allowed):
        raise ConfigError(f"trainer.{key}={value!r}; allowed: {allowed}")

    acc = trainer.get("accumulate_grad_batches")
    if isinstance(acc, int) and acc < 1:
        bad("accumulate_grad_batches", acc, "an integer >= 1")
    clip = trainer.get("gradient_clip_val")
    if isinstance(clip, (int, float)) and not (math.isfinite(clip) and clip >= 0):
        bad("gradient_clip_val", clip, "a finite number >= 0 (0 or null: no clipping)")
    every = trainer.get("val_check_interval")
    if isinstance(every, float) and not 0 < every <= 1 or isinstance(every, int) and every < 1:
        bad("val_check_interval", every, "a fraction of the epoch in (0, 1], or a number of batches >= 1")


def _check_ckpt_path(path: str, default_root_dir) -> None:
    """The values of --ckpt_path that Lightning would only turn into a traceback (or ignore); `last` and `best`
    were resolved or refused by _named_checkpoint."""
    allowed = "allowed: a checkpoint file, or last (the run's newest last.ckpt)"
    if not str(path).strip():  # e.g. --ckpt_path=$CKPT with CKPT unset
        raise ConfigError(f"--ckpt_path is empty; {allowed}")
    if os.path.isdir(path):
        raise ConfigError(f"--ckpt_path {path} is a folder; {allowed}, e.g. {os.path.join(path, 'last.ckpt')}")
    if path == "hpc" and not hpc_checkpoints(default_root_dir):
        raise ConfigError(f"--ckpt_path hpc: no hpc_ckpt_*.ckpt in {default_root_dir or os.getcwd()}; {allowed}")


def _refuse_foreign_hpc_checkpoints(default_root_dir) -> None:
    found = foreign_hpc_checkpoints(default_root_dir)
    if found:
        raise ConfigError(f"{found[-1]} in {default_root_dir or os.getcwd()}: under SLURM Lightning would silently "
                          "resume this run from it (runs here save last.ckpt instead). Resume with "
                          "--ckpt_path last or a file, or move the hpc_ckpt files away")


def _tensorboard_args(logger):
    """The init_args of a TensorBoardLogger in the config; None for another logger (or none)."""
    if not hasattr(logger, "get") or not str(logger.get("class_path", "")).endswith("TensorBoardLogger"):
        return None
    return logger.init_args


def _log_folder(args) -> str:
    return os.path.join(args.save_dir, args.get("name") or "")


def _versions(args) -> List[Tuple[int, str]]:
    """(N, <save_dir>/<name>/version_N) of every run of this logger, newest first."""
    folder = _log_folder(args)
    found = [(int(m.group(1)), os.path.join(folder, d)) for d in (os.listdir(folder) if os.path.isdir(folder) else [])
             if (m := VERSION_DIR.fullmatch(d))]
    return sorted(found, reverse=True)


def _last_of(run: str) -> Optional[str]:
    path = os.path.join(run, "checkpoints", "last.ckpt")
    return path if os.path.isfile(path) else None


def _continue_logger_version(logger, ckpt_path: str) -> None:
    """`fit --ckpt_path` continues in the TensorBoard version the checkpoint belongs to: a new version
    would split the curves in two and restart the best-checkpoint tracking (and, for `last`, hold no
    last.ckpt to find). `last`: the latest version that has one; a file in <save_dir>/<name>/version_N/
    checkpoints/: version N."""
    args = _tensorboard_args(logger)
    if args is None or args.get("version") is not None:
        return
    if ckpt_path == "last":
        args.version = next((n for n, run in _versions(args) if _last_of(run)), None)
        return
    checkpoints = os.path.dirname(os.path.abspath(ckpt_path))
    version = os.path.dirname(checkpoints)
    m = VERSION_DIR.fullmatch(os.path.basename(version))
    if m and os.path.basename(checkpoints) == "checkpoints" and \
            os.path.dirname(version) == os.path.abspath(_log_folder(args)):
        args.version = int(m.group(1))


def _run_folders(logger):
    """(where, folders): the TensorBoard run folders `--ckpt_path last` can mean, newest version first (the
    logger's pinned version, else every <save_dir>/<name>/version_N) and how to name them; None for another
    logger (Lightning's own lookup)."""
    args = _tensorboard_args(logger)
    if args is None:
        return None
    version = args.get("version")
    if version is not None:
        run = os.path.join(_log_folder(args), version if isinstance(version, str) else f"version_{version}")
        return run, [run]
    return os.path.join(_log_folder(args), "version_*"), [run for _, run in _versions(args)]


def _named_checkpoint(subcommand: Optional[str], name: str, cfg) -> Optional[str]:
    """`--ckpt_path last` / `best` outside `fit`'s own resume. Lightning resolves them only against the new
    run's (empty) version folder: `last` then evaluated the untrained model after a warning, exit 0, and
    `best` ended in a traceback. `last` for validate/test/predict: the newest last.ckpt of this logger's
    runs (as `fit --ckpt_path last` resumes); `best` is never known to a new Trainer: an error naming the
    checkpoints there are. None: leave it to Lightning."""
    if name == "last" and subcommand == "fit":
        return None  # resumes (or starts fresh, for SLURM scripts): see _continue_logger_version
    if name == "last" and cfg.get("last_checkpoint") and cfg.last_checkpoint.get("dirpath"):
        return None  # a fixed folder: Lightning finds last.ckpt there itself
    runs = _run_folders(cfg.get("trainer", {}).get("logger"))
    if runs is None and name == "last":
        return None
    where, folders = runs or ("this run's log folder", [])
    if name == "last":
        found = next((last for run in folders if (last := _last_of(run))), None)
        if found:
            return found
        raise ConfigError(f"--ckpt_path last: no checkpoints/last.ckpt under {where} (the logger's save_dir and "
                          f"name); pass the checkpoint file, e.g. --ckpt_path RUN/checkpoints/last.ckpt")
    kept = next((files for run in folders if (files := sorted(
        f for f in glob.glob(os.path.join(glob.escape(run), "checkpoints", "*.ckpt"))
        if os.path.basename(f) != "last.ckpt"))), [])
    raise ConfigError(f"--ckpt_path best: a new {subcommand} run does not know the best checkpoint of an earlier "
                      f"one; pass the file, e.g. " + (", ".join(kept) if kept else "--ckpt_path RUN/checkpoints/best-N.ckpt"))


def _warn_other_data(path: str, trained: dict, data_cfg) -> None:
    """Lightning restores the model's settings from a checkpoint, not the data's: evaluating at another
    img_size or on other data than the run was trained on would pass silently. trained: the checkpoint's
    datamodule hyperparameters."""
    keys = ("dataset", "root", "img_size", "num_classes", "difficulty", "seed", "val_size")
    now = data_cfg or {}
    differ = [f"data.{k}={trained[k]!r} (now {now.get(k)!r})" for k in keys  # None now: derived from the data
              if trained.get(k) is not None and now.get(k) is not None and trained[k] != now.get(k)]
    if differ:
        print(f"warning: {path} was trained with {', '.join(differ)}; pass those --data.* settings to evaluate "
              f"on the data it was trained for", file=sys.stderr)


def _message(e: Exception) -> str:
    """The error's own message: one raised in a DataLoader worker arrives wrapped in the worker's traceback."""
    text = str(e)
    if "Original Traceback" in text:
        last = [ln for ln in text.splitlines() if ln.strip()][-1]
        text = re.sub(r"^[\w.]*Error: ", "", last)
    return text


def _maybe_ablation(argv: List[str]) -> Optional[int]:
    """A `fit` config with an `ablation:` section runs every arm (biformer_lit/ablation.py); None otherwise."""
    from .ablation import AblationError, maybe_run_ablation
    try:
        return maybe_run_ablation(argv)
    except AblationError as e:  # a bad ablation section or selection: user input
        raise ConfigError(str(e)) from e


def make_cli(args: Optional[List[str]] = None, run: bool = True) -> BiFormerCLI:
    """The LightningCLI (args=None: sys.argv). run=False builds model, data and trainer only (tests, notebooks)."""
    from .data import ImageDataModule  # lazily: report/visualize don't need the data stack
    return BiFormerCLI(ClassificationModule, ImageDataModule, subclass_mode_model=False, subclass_mode_data=False,
                       parser_class=ShortErrorParser, parser_kwargs={"epilog": MORE_COMMANDS},
                       trainer_defaults=TRAINER_DEFAULTS, save_config_kwargs={"overwrite": True},
                       auto_configure_optimizers=False,  # the module's recipe owns the optimizer and schedule
                       args=args, run=run)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit status (0, or 2 for bad input)."""
    from_sys = argv is None  # LightningCLI warns when given args equal to sys.argv: let it read them itself
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "report":
        from .report import main as report_main
        return report_main(argv[1:])
    if argv and argv[0] == "visualize":
        from .visualize import main as visualize_main
        return visualize_main(argv[1:])
    try:
        if argv and argv[0] == "fit":
            code = _maybe_ablation(argv)
            if code is not None:
                return code
        make_cli(None if from_sys else argv)
    except SIGTERMException:
        # Lightning stopped after the batch in flight; PreemptionCheckpoint saved last.ckpt
        print("interrupted by SIGTERM: last.ckpt saved; run the same command with --ckpt_path last to continue",
              file=sys.stderr)
        return 143
    except _user_errors() as e:
        print(f"error: {_message(e)}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as e:  # torch.save wraps a full disk's OSError in a RuntimeError
        return report_storage_error(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
