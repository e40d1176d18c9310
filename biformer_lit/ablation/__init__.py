"""Ablation runner: a `fit` config whose `ablation:` section names arms as overrides of it.

    python cli.py fit --config experiments/topk_ablation.yaml [--ablation.only=ARM | --ablation.index=I]
                      [--ablation.parallel=N] [--ablation.seeds=[0,1,2]] [any --trainer.* / --model.* flag]

Every (arm, seed) is a separate, complete training run in its own process, logged to
runs/<ablation>/<arm>/seed_<n>/ so that `tensorboard --logdir runs/<ablation>` overlays the arms. All arms
share the seed, the data and its order, and (where parameter shapes agree) the initialisation. Each run's
config is resolved once, by `fit`'s own parser (the command line's flags included), and its data module and
model are built on the CPU and dropped before any run starts: a typo or a value out of range is one error.
Re-running the same command skips finished runs and resumes interrupted ones (see record.py); an
invocation claims its run folders (biformer_lit.runs), and signals reach the running arms (see run.py).

    plan.py    the typed section, the arms it selects, each run's config
    run.py     running, claiming and signalling the arms' processes
    record.py  each run's status and settings, compared on a rerun
"""
import contextlib
from pathlib import Path
from typing import Callable, Tuple

from ..errors import UserError
from ..report import load_runs, verdict_lines
from ..runs import claim
from ..settings import plain
from .plan import Ablation, arm_config, check_flags
from .run import Job, run_jobs

__all__ = ["Ablation", "run_ablation"]


def run_ablation(section: dict, base: dict, from_files: dict, resolve: Callable[[dict, bool], Tuple[dict, str]]) -> int:
    """Run the selected arms x seeds of `section` (the parsed `ablation:` group). base: the resolved fit config;
    from_files: the same without the command line's flags; resolve(config, build): a run's config resolved
    by fit's parser, as (dict, YAML text), its data and model built when `build`. Returns the exit status."""
    ablation = Ablation(**plain(section))
    check_flags(ablation, from_files, base)
    if base.get("ckpt_path") not in (None, "last"):  # `last`: each arm resumes its own, as the runner does anyway
        raise UserError(f"--ckpt_path {base['ckpt_path']}: every arm would resume from that one file, and take its "
                        "model settings; allowed: no --ckpt_path (or last): the same command resumes each "
                        "interrupted arm from its own last.ckpt")
    jobs = []
    for arm in ablation.selected:
        for i, seed in enumerate(ablation.seeds):
            run_dir = ablation.run_dir(arm["name"], seed)
            try:  # the seeds only seed differently: build each arm's objects once
                config, text = resolve(arm_config(base, arm, seed, run_dir, ablation.visualize), i == 0)
            except UserError as e:
                raise UserError(f"arm {arm['name']}: {e} (no run started)") from None
            jobs.append(Job(ablation.name, arm, seed, run_dir, config, text, ablation.reference))
    with contextlib.ExitStack() as claims:
        if not ablation.dry_run:  # claimed before their status is read, held to the end
            for job in jobs:
                job.lock = claims.enter_context(claim(job.run_dir))
        code = run_jobs(jobs, ablation.parallel, ablation.dry_run)
    if code == 0 and not ablation.dry_run:
        where = Path(ablation.runs_dir) / ablation.name
        print(f"[ablation] done. Compare: tensorboard --logdir {where}   Report: python cli.py report {where}",
              flush=True)
        for line in verdict_lines(load_runs(where)):
            print(f"[ablation] {line}", flush=True)
    return code
