"""Ablation runner: one `fit` config + an `ablation:` section naming arms as overrides of it.

    python cli.py fit --config experiments/topk_ablation.yaml [--ablation.only=ARM | --ablation.index=I]
                      [--ablation.parallel=N] [--ablation.seeds=[0,1,2]] [any --trainer.* / --model.* flag]

Every (arm, seed) is a separate, complete training run in its own process (so every Lightning
strategy works inside an arm), logged to runs/<ablation>/<arm>/seed_<n>/ so that
`tensorboard --logdir runs/<ablation>` overlays the arms. All arms share the seed, the data and its
order, and (where parameter shapes agree) the initialisation. Before any run starts, each arm's `fit`
command (its config and the flags passed through) is parsed, and its data module and model built on the
CPU and dropped (nothing written): a typo or a value out of range is one error.
Re-running the same command skips finished runs and resumes interrupted ones from their last checkpoint;
a run folder holding a run with other settings (config or flags; `--x 2` and `--x=2` are the same) is
refused, never skipped nor resumed, unless it saved no checkpoint (it failed or stopped before its first
validation): that one is replaced. An invocation claims its run folders (an flock on <run>/.lock, also
held by an arm's fit while it runs): a second invocation on any of them is refused, while other arms
(SLURM array tasks) run at once. SIGTERM and SIGUSR1 to the runner (SLURM's preemption / time-limit
signals) go on, as they are, to the running arms, which are then recorded interrupted; no further arm
starts and the runner exits 128 + signal (143: SIGTERM). --help / --print_config / --<class>.help answer
for each arm's config and train nothing.

The section:
    ablation:
      name: topk                 # runs/<name>/...
      seeds: [0]                 # seed_everything of each replicate (distinct integers)
      parallel: 1                # runs at once (on CUDA machines run i gets GPU i % n_gpus)
      visualize: true            # routing pictures in TensorBoard (RoutingVisualizer); true or false
      arms:                      # each: a name (a folder name) and its overrides, no other key
        - name: k1
          overrides: {model.model_kwargs.topks: [1, 1, 1, 1]}   # dotted keys into the fit config
"""
import contextlib
import copy
import fcntl
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional

import yaml

from .errors import write_text_atomic

ABLATION_KEYS = {"name", "seeds", "parallel", "visualize", "arms", "only", "index", "runs_dir", "dry_run"}
ARM_KEYS = ("name", "overrides")
BARE_FLAGS = ("-h", "--help")  # the only `fit` options that take no value
LOCK = ".lock"  # in each run folder: claimed by the invocation running it
FORWARDED = (signal.SIGTERM, signal.SIGUSR1)  # SLURM: preemption / time limit, and --signal=SIGUSR1@<s>
INSPECT_FLAGS = ("-h", "--help", "--print_config")  # and --<class>.help: `fit` answers, trains nothing


NOT_TEXT = "not UTF-8 text; allowed: a YAML file"


class AblationError(ValueError):
    """A malformed ablation section or selection (user input)."""


def _options(argv: List[str]):
    """(key, value, the option as `--key=value`) per option: `--key value` and `--key=value` alike; value None
    where none is given."""
    i = 0
    while i < len(argv):
        key, eq, val = argv[i].partition("=")
        if not eq:
            val = None
            if key.startswith("-") and key not in BARE_FLAGS and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                i += 1
                val = argv[i]
        yield key, val, key if val is None else f"{key}={val}"
        i += 1


def normalised(flags: List[str]) -> List[str]:
    """Flags as `--key=value`: the same setting written either way is recorded and compared as the same."""
    return [option for _, _, option in _options(flags)]


def _split_argv(argv: List[str]):
    """-> (config files, --ablation.* overrides, the other flags passed through to every run, normalised)."""
    configs, ablation, rest = [], {}, []
    for key, val, option in _options(argv):
        if key in ("--config", "-c"):
            if val is None:
                raise AblationError("--config needs a file")
            configs.append(val)
        elif key.startswith("--ablation."):
            if val is None:
                raise AblationError(f"{key} needs a value")
            name = key[len("--ablation."):]
            if not val.strip():  # e.g. --ablation.index=$SLURM_ARRAY_TASK_ID outside an array job
                raise AblationError(f"{key} is empty" + (" (is $SLURM_ARRAY_TASK_ID set?)" if name == "index" else ""))
            try:
                ablation[name] = yaml.safe_load(val)
            except yaml.YAMLError as e:
                raise AblationError(f"{key}={val!r} is not a valid value: {str(e).splitlines()[0]}") from None
        else:
            rest.append(option)
    return configs, ablation, rest


def deep_merge(base: dict, other: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in other.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def set_dotted(cfg: dict, dotted: str, value) -> None:
    node = cfg
    *path, last = dotted.split(".")
    for part in path:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise AblationError(f"override {dotted!r}: {part!r} is not a section")
    node[last] = copy.deepcopy(value)


def load_config(paths: List[str]) -> dict:
    cfg = {}
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"config file not found: {p}")
        with open(p) as f:
            try:
                loaded = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise AblationError(f"config file {p} is not valid YAML: {' '.join(str(e).split())}") from None
            except UnicodeDecodeError:  # e.g. a checkpoint given as --config
                raise AblationError(f"config file {p} is not a text file ({NOT_TEXT})") from None
        if not isinstance(loaded, dict):
            raise AblationError(f"config file {p} holds a {type(loaded).__name__}; allowed: a mapping of "
                                "sections (model:, data:, trainer:, ...)")
        cfg = deep_merge(cfg, loaded)
    return cfg


def _as_int(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise AblationError(f"ablation.{name}={value!r}; allowed: an integer >= {lo}")
    return value


def _as_bool(name: str, value) -> bool:
    if not isinstance(value, bool):  # bool("maybe") would be true
        raise AblationError(f"ablation.{name}={value!r}; allowed: true or false")
    return value


def _as_text(value):
    """YAML reads `name: 1` as a number: names and paths are text."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _as_name(key: str, value, path: bool = False) -> str:
    """A folder name (a path where path=True) below runs_dir."""
    value = _as_text(value)
    if not isinstance(value, str) or not value.strip() or not path and ("/" in value or value in (".", "..")):
        raise AblationError(f"{key}={value!r}; allowed: " + ("a folder path" if path else "a folder name (no '/')"))
    return value


def _as_arm(i: int, arm) -> dict:
    where = f"ablation.arms[{i}]"
    if not isinstance(arm, dict) or "name" not in arm:
        raise AblationError(f"{where}={arm!r}; allowed: {{name: ..., overrides: {{dotted.key: value}}}}")
    unknown = sorted(map(str, set(arm) - set(ARM_KEYS)))
    if unknown:  # e.g. `overides:` would run the unmodified base config
        raise AblationError(f"{where} ({arm['name']}): unknown key(s) {unknown}; allowed: {', '.join(ARM_KEYS)}")
    overrides = arm.get("overrides") or {}
    if not isinstance(overrides, dict) or not all(isinstance(k, str) and k for k in overrides):
        raise AblationError(f"{where}.overrides={arm['overrides']!r}; allowed: a mapping of dotted config keys "
                            "to values, e.g. {model.lr: 0.001}")
    return dict(name=_as_name(f"{where}.name", arm["name"]), overrides=overrides, index=i)


def plan(section: dict) -> dict:
    """Validate the ablation section; returns it with defaults filled in."""
    if not isinstance(section, dict):
        raise AblationError(f"the ablation section holds a {type(section).__name__}; allowed: a mapping "
                            f"({', '.join(sorted(ABLATION_KEYS))})")
    unknown = set(section) - ABLATION_KEYS
    if unknown:
        raise AblationError(f"unknown ablation key(s) {sorted(unknown)}; allowed: {sorted(ABLATION_KEYS)}")
    arms = section.get("arms") or []
    if not isinstance(arms, list) or not arms:
        raise AblationError("ablation.arms must be a non-empty list of {name: ..., overrides: {...}}")
    arms = [_as_arm(i, a) for i, a in enumerate(arms)]
    names = [a["name"] for a in arms]
    if len(set(names)) != len(names):
        raise AblationError(f"arm names must be unique: {names}")
    seeds = section.get("seeds", [0])
    seeds = [seeds] if isinstance(seeds, int) and not isinstance(seeds, bool) else seeds
    if not isinstance(seeds, list) or not seeds:
        raise AblationError(f"ablation.seeds={seeds!r}; allowed: an integer or a list of them, e.g. [0, 1, 2]")
    seeds = [_as_int("seeds", x, 0) for x in seeds]
    from .reliability import check_seed  # here: the runner imports no torch / Lightning until it must
    for x in seeds:  # each is its arm's seed_everything: beyond its range every arm would fail
        check_seed("ablation.seeds", x, AblationError)
    if len(set(seeds)) != len(seeds):  # both would run in the same seed_<n> folder
        raise AblationError(f"ablation.seeds={seeds!r}; allowed: distinct integers >= 0")
    out = dict(name=_as_name("ablation.name", section.get("name", "ablation")), seeds=seeds,
               parallel=_as_int("parallel", section.get("parallel", 1), 1),
               visualize=_as_bool("visualize", section.get("visualize", True)), arms=arms,
               runs_dir=_as_name("ablation.runs_dir", section.get("runs_dir", "runs"), path=True),
               dry_run=_as_bool("dry_run", section.get("dry_run", False)))
    only, index = section.get("only"), section.get("index")
    if only is not None and index is not None:
        raise AblationError("give --ablation.only or --ablation.index, not both")
    if only is not None:
        wanted = [_as_text(w) for w in (only if isinstance(only, list) else [only])]
        if not wanted:
            raise AblationError(f"--ablation.only=[]; allowed: an arm name or a non-empty list of them; "
                                f"arms: {', '.join(names)}")
        missing = [w for w in wanted if w not in names]
        if missing:
            raise AblationError(f"--ablation.only={missing[0]!r}: no such arm; arms: {', '.join(names)}")
        out["arms"] = [a for a in arms if a["name"] in wanted]
    if index is not None:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(arms):
            raise AblationError(f"--ablation.index={index!r}; allowed: an integer in 0..{len(arms) - 1} "
                                f"({len(arms)} arms)")
        out["arms"] = [arms[index]]
    return out


def arm_config(base: dict, arm: dict, seed: int, run_dir: Path, visualize: bool) -> dict:
    cfg = copy.deepcopy(base)
    for key, value in (arm.get("overrides") or {}).items():
        set_dotted(cfg, key, value)
    cfg["seed_everything"] = seed
    trainer = cfg.setdefault("trainer", {})
    trainer["logger"] = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                         "init_args": {"save_dir": str(run_dir.parent.parent), "name": arm["name"],
                                       "version": run_dir.name, "default_hp_metric": False}}
    callbacks = list(trainer.get("callbacks") or [])
    callbacks.append({"class_path": "biformer_lit.callbacks.RunStats",
                      "init_args": {"knobs": dict(arm.get("overrides") or {}, arm=arm["name"], seed=seed)}})
    if visualize:
        callbacks.append({"class_path": "biformer_lit.callbacks.RoutingVisualizer"})
    trainer["callbacks"] = callbacks
    return cfg


def read_arm(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "arm.json").read_text())
    except (OSError, ValueError):
        return {}


def run_flags(flags: List[str]) -> List[str]:
    """The passed-through flags that make a run this run, normalised. `--ckpt_path last` is left out: it only
    says "resume", which the runner does anyway (an arm's own last.ckpt), so it does not make another run."""
    return [f for f in normalised(flags) if f != "--ckpt_path=last"]


def settings(job: dict, passthrough: List[str]) -> dict:
    """What makes a run this run: its whole config and the flags passed through (JSON-normalised)."""
    return json.loads(json.dumps(dict(config=job["config"], flags=run_flags(passthrough)), default=str))


def _differences(old: dict, new: dict, prefix: str = "") -> List[str]:
    keys = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return keys


def check_same_settings(job: dict, current: dict) -> bool:
    """A run folder from other settings (say a shortened run, or the CPU config before the paper-scale
    one) must not be skipped as finished nor resumed: refuse, naming what differs. True where that run
    saved no checkpoint (it failed or stopped before its first validation): nothing to lose, replace it."""
    info = read_arm(job["run_dir"])
    recorded = info.get("settings")
    if recorded is None:  # no earlier run (or one from before settings were kept)
        return False
    recorded = dict(recorded, flags=run_flags(recorded.get("flags", [])))  # recorded before flags were normalised
    if recorded == current:
        return False
    if info.get("status") != "finished" and not any((job["run_dir"] / "checkpoints").glob("*.ckpt")):
        return True
    diff = _differences(recorded, current)
    raise AblationError(f"{job['run_dir']} holds a run with other settings ({'; '.join(diff[:3])}"
                        f"{'; ...' if len(diff) > 3 else ''}): use another --ablation.runs_dir, or delete "
                        "that folder to run it again")


def clear(run_dir: Path) -> None:
    for path in run_dir.iterdir():
        if path.name != LOCK:  # the claimed lock file stays: a new one would be unclaimed
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def write_status(run_dir: Path, **info) -> None:
    write_text_atomic(run_dir / "arm.json", json.dumps(info, indent=1))


def _fit_command(config_path: Path, passthrough: List[str]) -> List[str]:
    return [sys.executable, "-m", "biformer_lit.cli", "fit", "--config", str(config_path), *passthrough]


def _label(job: dict) -> str:
    return f"{job['arm']['name']}/seed_{job['seed']}"


def _write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def inspecting(passthrough: List[str]) -> bool:
    """--help, --print_config, --<class>.help: `fit` answers and exits 0 without training."""
    keys = [a.partition("=")[0] for a in passthrough]
    return any(k in INSPECT_FLAGS or k.endswith(".help") for k in keys)


def show_arms(jobs: List[dict], passthrough: List[str]) -> int:
    """--help / --print_config: what `fit` says of each run's config; nothing trains, no status changes."""
    printing = any(a.startswith("--print_config") for a in passthrough)
    with tempfile.TemporaryDirectory() as tmp:
        for j in jobs if printing else jobs[:1]:  # help is the same for every arm
            path = _write_config(Path(tmp) / "config.yaml", j["config"])
            print(f"# [ablation] {_label(j)}", flush=True)
            code = subprocess.call(_fit_command(path, passthrough))
            if code:
                return code
    return 0


def _parsed(path: Path, flags: List[str], arm: str) -> dict:
    """The config `fit --config path *flags` resolves to (parsed and type-checked, nothing built); an
    AblationError naming the arm if it does not parse."""
    from .cli import make_cli
    out, err = io.StringIO(), io.StringIO()
    try:  # --print_config: the parser exits once the arguments are parsed and type-checked
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            make_cli(["fit", "--config", str(path), *flags, "--print_config"])
    except SystemExit as e:
        if e.code:
            message = err.getvalue().partition("error: ")[2].strip() or f"exit status {e.code}"
            raise AblationError(f"arm {arm}: {message} (no run started)") from None
    return yaml.safe_load(out.getvalue()) or {}


def _leaves(prefix: str, value) -> List[str]:
    """Dotted keys of an override's values: a mapping value sets each of its keys."""
    if isinstance(value, dict) and value:
        return [leaf for k, v in value.items() for leaf in _leaves(f"{prefix}.{k}", v)]
    return [prefix]


UNSET = "unset"


def _lookup(cfg: dict, dotted: str) -> str:
    """The value at a dotted key, as text (`unset` where there is none)."""
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return UNSET
        node = node[part]
    return repr(node)


def check_commands(jobs: List[dict], passthrough: List[str]) -> None:
    """Parse each arm's `fit` command as its run will, then check the settings its run builds from: a typo in
    a flag or an override (also inside model_kwargs), or a value out of range, is one error before any run
    starts, not a failed run per arm (and a folder that refuses the fixed command).
    A flag passed to every arm must not replace what an arm sets: `--model.model_kwargs={depths: ...}`
    replaces the whole mapping, the arms' `model.model_kwargs.topks` with it, and every arm would train
    the same model under its own name."""
    with tempfile.TemporaryDirectory() as tmp:
        for j in [j for j in jobs if j["seed"] == jobs[0]["seed"]]:  # one per arm: seeds only seed differently
            path = _write_config(Path(tmp) / "config.yaml", j["config"])
            name = j["arm"]["name"]
            resolved = _parsed(path, passthrough, name)
            try:
                check_settings(resolved)
            except ValueError as e:
                raise AblationError(f"arm {name}: {e} (no run started)") from None
            if not passthrough:
                continue
            try:  # the arm's values as the parser reads them (1e-3 -> 0.001, ...)
                own = _parsed(path, [], name)
            except AblationError:  # valid only with the flags (they were parsed above): nothing to compare
                continue
            for key in [leaf for k, v in (j["arm"].get("overrides") or {}).items() for leaf in _leaves(k, v)]:
                if _lookup(own, key) != _lookup(resolved, key):
                    flags = [f for f in passthrough if (key + ".").startswith(f.lstrip("-").partition("=")[0] + ".")]
                    raise AblationError(
                        f"arm {name}: {', '.join(flags) or 'the flags passed to every arm'} replace(s) the arm's own "
                        f"{key}={_lookup(own, key)} (it would be {_lookup(resolved, key)}), so the arms would not "
                        f"differ there; pass only the keys you change (e.g. --model.model_kwargs.depths=[...]) and "
                        f"leave the arms' own keys to them (no run started)")


def check_settings(resolved: dict) -> None:
    """What the parser leaves to the objects (the keys inside model_kwargs, value ranges, trainer settings
    Lightning takes unchecked): the data module and the model of a resolved `fit` config are built, on the CPU,
    and dropped; ValueError otherwise. No data file is read beyond the class folders' names."""
    from .cli import _check_trainer, _with_allowed_kwargs
    from .data import DataError, ImageDataModule
    from .module import ClassificationModule
    _check_trainer(resolved.get("trainer") or {})
    data = ImageDataModule(**resolved["data"])
    try:
        classes = data.num_classes
    except DataError:  # no data here (e.g. a dry run elsewhere): the arm's run says so; check the model anyway
        classes = 2
    try:
        ClassificationModule(**dict(resolved["model"], num_classes=classes, img_size=data.img_size))
    except TypeError as e:  # a key inside model_kwargs the model does not take; else a bug
        if "unexpected keyword argument" not in str(e):
            raise
        raise ValueError(_with_allowed_kwargs(str(e))) from None


@contextlib.contextmanager
def claimed(run_dir: Path):
    """This invocation's claim on a run folder: an exclusive flock on its lock file, so a second invocation
    on the same run is refused (SLURM array tasks run other arms of one ablation at once). A flock ends with
    the processes holding it: no stale claim after a kill. Yields the file descriptor."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise AblationError(f"{run_dir} is being run by another invocation ({f.read().strip()}): wait for it "
                                "to end, or select other arms (--ablation.only / --ablation.index)") from None
        except OSError as e:  # e.g. Lustre mounted without `flock`: run unclaimed rather than not at all
            print(f"warning: cannot lock {f.name} ({e.strerror}): a second invocation of this run would not be "
                  "refused", file=sys.stderr)
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()}")
        f.flush()
        yield f.fileno()


class Children:
    """The arms' running `fit` processes. While entered (in the main thread, where signal handlers run; the
    arms wait in pool threads), SIGTERM and SIGUSR1 to the runner go on to them (SIGUSR1 as SIGTERM outside
    SLURM, where a run does not handle it); after a signal no further run starts."""

    def __init__(self):
        self.lock = threading.RLock()  # re-entrant: a second signal may arrive while the first is passed on
        self.running = set()
        self.stopped_by = None  # the signal that stopped the ablation
        self._handlers = {}

    def __enter__(self):
        from lightning.fabric.plugins.environments import SLURMEnvironment
        # a run handles SIGUSR1 (save, requeue) only under SLURM; elsewhere it would just die of it
        self.usr1_as = signal.SIGUSR1 if SLURMEnvironment.detect() else signal.SIGTERM
        if threading.current_thread() is threading.main_thread():
            self._handlers = {s: signal.signal(s, self.stop) for s in FORWARDED}
        return self

    def __exit__(self, *exc):
        for s, handler in self._handlers.items():
            signal.signal(s, handler)

    def start(self, cmd: List[str], **kwargs) -> Optional[subprocess.Popen]:
        with self.lock:  # checked and started at once: a signal in between would miss the new process
            if self.stopped_by:
                return None
            proc = subprocess.Popen(cmd, **kwargs)
            self.running.add(proc)
            return proc

    def wait(self, proc: subprocess.Popen) -> int:
        code = proc.wait()
        with self.lock:
            self.running.discard(proc)
        return code

    def stop(self, signum: int, frame=None, forward: bool = True) -> None:
        self.stopped_by = signum
        with self.lock:
            for proc in self.running if forward else ():
                proc.send_signal(self.usr1_as if signum == signal.SIGUSR1 else signum)


def run_one(job: dict, passthrough: List[str], slot: int, children: Children) -> Optional[int]:
    """One arm's run: its exit status, None when the ablation was stopped before it started."""
    run_dir: Path = job["run_dir"]
    run_dir.mkdir(parents=True, exist_ok=True)
    info = dict(ablation=job["ablation"], arm=job["arm"]["name"], index=job["index"], seed=job["seed"],
                overrides=job["arm"].get("overrides") or {}, settings=settings(job, passthrough))
    cmd = _fit_command(_write_config(run_dir / "config.yaml", job["config"]), passthrough)
    last = run_dir / "checkpoints" / "last.ckpt"
    resuming = last.is_file()
    if resuming:
        cmd.append(f"--ckpt_path={last}")  # interrupted earlier: continue, don't restart
    env = dict(os.environ)
    gpus = _cuda_count()
    if gpus and job["parallel"] > 1 and "CUDA_VISIBLE_DEVICES" not in os.environ:
        env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
    logged = job["parallel"] > 1  # runs at once would interleave on the terminal: each writes its stdout.log
    t0 = time.time()
    with open(run_dir / "stdout.log", "a") if logged else contextlib.nullcontext() as log:
        proc = children.start(cmd, env=env, stdout=log, stderr=subprocess.STDOUT if logged else None,
                              pass_fds=[job["lock"]])  # the claim outlives the runner while the arm runs
        if proc is None:
            return None
        os.write(job["lock"], f", its fit: pid {proc.pid}".encode())  # the claim's holder after a runner's kill
        write_status(run_dir, **info, status="running", resumed=resuming, pid=proc.pid)
        print(f"[ablation] start {_label(job)}{' (resuming)' if resuming else ''}", flush=True)
        code = children.wait(proc)
    status = "finished" if code == 0 else "interrupted" if children.stopped_by else f"failed (exit {code})"
    write_status(run_dir, **info, status=status, seconds=round(time.time() - t0, 1))
    print(f"[ablation] {status}: {_label(job)} in {time.time() - t0:.0f}s", flush=True)
    return code


def _cuda_count() -> int:
    try:
        import torch
        return torch.cuda.device_count()
    except Exception:  # no usable CUDA: CPU runs
        return 0


def maybe_run_ablation(argv: List[str]) -> Optional[int]:
    """Called by the CLI for `fit`: runs the ablation if the configs have an `ablation:` section."""
    if not argv or argv[0] != "fit":
        return None
    configs, ablation_flags, passthrough = _split_argv(argv[1:])
    cfg = load_config(configs)
    if "ablation" not in cfg:
        if ablation_flags:
            raise AblationError("--ablation.* given, but no config has an `ablation:` section")
        return None
    for key, val, _ in _options(passthrough):
        if key == "--ckpt_path" and val != "last":  # `last`: each arm's own, as the runner resumes anyway
            raise AblationError(f"--ckpt_path {val}: every arm would resume from that one file, and take its model "
                                "settings; allowed: no --ckpt_path (or last): the same command resumes each "
                                "interrupted arm from its own last.ckpt")
    section = cfg.pop("ablation") or {}
    p = plan(deep_merge(section, ablation_flags) if isinstance(section, dict) else section)  # plan names a non-mapping
    jobs = []
    for arm in p["arms"]:
        for seed in p["seeds"]:
            run_dir = Path(p["runs_dir"]) / p["name"] / arm["name"] / f"seed_{seed}"
            jobs.append(dict(arm=arm, seed=seed, run_dir=run_dir, ablation=p["name"], parallel=p["parallel"],
                             index=arm["index"],
                             config=arm_config(cfg, arm, seed, run_dir, p["visualize"])))
    if inspecting(passthrough):
        return show_arms(jobs, passthrough)
    check_commands(jobs, passthrough)
    with contextlib.ExitStack() as claims:
        if not p["dry_run"]:  # claimed before their status is read, held to the end
            for j in jobs:
                j["lock"] = claims.enter_context(claimed(j["run_dir"]))
        return run_jobs(p, jobs, passthrough)


def run_jobs(p: dict, jobs: List[dict], passthrough: List[str]) -> int:
    """Skip the finished runs, run the others (p: the plan); the exit status."""
    replaced = [j for j in jobs if check_same_settings(j, settings(j, passthrough))]
    for j in replaced:
        print(f"[ablation] {'would replace' if p['dry_run'] else 'replacing'} {_label(j)}: a run with other "
              "settings that saved no checkpoint", flush=True)
        if not p["dry_run"]:
            clear(j["run_dir"])
    todo = [j for j in jobs if read_arm(j["run_dir"]).get("status") != "finished"]
    for j in jobs:
        if j not in todo:
            print(f"[ablation] skip finished {_label(j)}", flush=True)
    print(f"[ablation] {p['name']}: {len(jobs)} run(s), {len(todo)} to do, {p['parallel']} at a time", flush=True)
    if p["dry_run"]:
        for j in todo:
            print(f"[ablation] would run {_label(j)} -> {j['run_dir']}")
        return 0
    with Children() as children, ThreadPoolExecutor(max_workers=p["parallel"]) as pool:
        try:
            codes = list(pool.map(lambda ij: run_one(ij[1], passthrough, ij[0], children), enumerate(todo)))
        except KeyboardInterrupt:  # Ctrl-C reached the arms too (one process group): start no further run
            children.stop(signal.SIGINT, forward=False)
    if children.stopped_by:
        print(f"[ablation] stopped by {signal.Signals(children.stopped_by).name}: running arms interrupted, no "
              "further run started; run the same command to continue", file=sys.stderr, flush=True)
        return 128 + children.stopped_by
    failed = [j for j, code in zip(todo, codes) if code]
    if failed:
        where = ", ".join(str(j["run_dir"] / "stdout.log") for j in failed) if p["parallel"] > 1 else "output above"
        print(f"error: {len(failed)} run(s) failed: {', '.join(map(_label, failed))} (see their {where})",
              file=sys.stderr)
        return 1
    print(f"[ablation] done. Compare: tensorboard --logdir {Path(p['runs_dir']) / p['name']}   "
          f"Report: python cli.py report {Path(p['runs_dir']) / p['name']}", flush=True)
    return 0
