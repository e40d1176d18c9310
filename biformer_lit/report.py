"""Turn an ablation's TensorBoard logs into a paper-style report (table + two plots).

Layout read: ``runs/<ablation>/<arm>/seed_<n>/`` holding ``events.out.tfevents.*``,
``hparams.yaml`` and ``arm.json``. Usage: ``python cli.py report runs/<ablation> [--out DIR]``.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from statistics import mean, stdev

from .errors import folder_arg, report_storage_error

EVENT_GLOB = "events.out.tfevents.*"
DASH = "—"
_SEED_DIR = re.compile(r"^seed_(\d+)$")


# --------------------------------------------------------------------------- loading


def _read_event_file(path: Path) -> dict[str, list]:
    """All scalar events of one file: {tag: [ScalarEvent(wall_time, step, value), ...]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # scalars=0 keeps every point (no reservoir sampling); purge off because we resolve
    # re-logged steps ourselves, across files, instead of letting TB drop them.
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0}, purge_orphaned_data=False)
    acc.Reload()
    return {tag: list(acc.Scalars(tag)) for tag in acc.Tags().get("scalars", [])}


def _run_root(event_dir: Path, top: Path) -> Path:
    """The folder that identifies a run: nearest ancestor with arm.json or named seed_<n>.

    So event files in sub-folders of one seed folder (e.g. a logger's version_1 after a
    resume) are merged into one run instead of counted as extra seeds.
    """
    for d in [event_dir, *event_dir.parents]:
        if (d / "arm.json").is_file() or _SEED_DIR.match(d.name):
            return d
        if d == top:
            break
    return event_dir


def _evaluation(scalars: dict) -> bool:
    """An event file of `validate` / `test` given a run's own config (an ablation arm's pins the logger to
    the run's folder): Lightning (its logger adds `epoch` to every point) logs them at step 0, since they
    don't restore the training step; a fit logs past step 0."""
    return "epoch" in scalars and {e.step for events in scalars.values() for e in events} == {0}


def _merge(files: list[Path]) -> dict[str, list[tuple[int, float]]]:
    """Merge the fit's event files of one run (evaluations left out); for a step logged more than once the
    latest value wins."""
    per_file = [_read_event_file(f) for f in files]
    kept = [i for i in range(len(files)) if not _evaluation(per_file[i])]

    # A resumed run appends a newer file: order files by their first wall time (then name),
    # so overwriting in that order keeps the most recent value of each step.
    def first_time(scalars: dict) -> float:
        times = [e.wall_time for events in scalars.values() for e in events]
        return min(times) if times else math.inf

    order = sorted(kept, key=lambda i: (first_time(per_file[i]), files[i].name))
    merged: dict[str, dict[int, float]] = {}
    for i in order:
        for tag, events in per_file[i].items():
            by_step = merged.setdefault(tag, {})
            for e in events:  # file order is write order, so later entries overwrite
                by_step[int(e.step)] = float(e.value)
    return {tag: sorted(by_step.items()) for tag, by_step in merged.items()}


def _read_arm_json(path: Path) -> dict:
    """A run's arm.json (the ablation runner's status file); ValueError naming the file if it is not one."""
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:  # the bare JSON message named no file
        raise ValueError(f"{path} is not valid JSON ({e}); allowed: the runner's status file (a JSON object): "
                         f"fix or delete it") from None
    if not isinstance(meta, dict):  # was an AttributeError traceback
        raise ValueError(f"{path} holds a {type(meta).__name__}; allowed: the runner's status file (a JSON "
                         f"object): fix or delete it")
    return meta


def load_runs(ablation_dir) -> list[dict]:
    """Every run below ``ablation_dir`` (any depth), with all its scalars.

    Each dict: ablation, arm, seed, index, status, overrides, path, n_event_files and
    scalars = {tag: [(step, value), ...] sorted by step}. Runs are sorted by (arm, seed).
    Raises FileNotFoundError if the folder does not exist.
    """
    top = Path(ablation_dir)
    if top.exists() and not top.is_dir():
        raise NotADirectoryError(f"{top} is a file; give the ablation's folder (runs/<ablation>)")
    if not top.is_dir():
        raise FileNotFoundError(f"no such ablation folder: {top}")

    groups: dict[Path, list[Path]] = {}
    for f in sorted(top.rglob(EVENT_GLOB)):
        if f.is_file():
            groups.setdefault(_run_root(f.parent, top), []).append(f)

    runs = []
    for root, files in groups.items():
        meta = _read_arm_json(root / "arm.json") if (root / "arm.json").is_file() else {}
        m = _SEED_DIR.match(root.name)
        seed = meta.get("seed", int(m.group(1)) if m else None)
        # Path fallback: <arm>/seed_<n>; a bare folder of events is its own arm.
        arm = meta.get("arm") or (root.parent.name if m else root.name)
        scalars = _merge(files)
        status = meta.get("status")
        if status is None:  # no arm.json: the end-of-fit summary tags mark a finished run
            status = "finished" if "best/val_top1" in scalars else "unknown"
        runs.append({
            "ablation": meta.get("ablation", top.name),
            "arm": str(arm),
            "seed": seed,
            "index": meta.get("index"),
            "status": status,
            "overrides": meta.get("overrides", {}),
            "path": root,
            "n_event_files": len(files),
            "scalars": scalars,
        })
    runs.sort(key=lambda r: (r["arm"], r["seed"] if r["seed"] is not None else -1))
    return runs


# --------------------------------------------------------------------------- summarizing


def _last(run: dict, tag: str) -> float | None:
    """Value at the highest step (once-per-run tags are logged a single time)."""
    points = run["scalars"].get(tag)
    return points[-1][1] if points else None


def best_top1(run: dict) -> float | None:
    """Best validation top-1 of one run: the logged ``best/val_top1``, else max of ``val/top1``."""
    best = _last(run, "best/val_top1")
    if best is not None:
        return best
    points = run["scalars"].get("val/top1")
    return max(v for _, v in points) if points else None


def best_top5(run: dict) -> float | None:
    """``best/val_top5``, else ``val/top5`` at the step of the best top-1 (the selected checkpoint)."""
    best = _last(run, "best/val_top5")
    if best is not None:
        return best
    top1, top5 = run["scalars"].get("val/top1"), dict(run["scalars"].get("val/top5", []))
    if not top1 or not top5:
        return None
    step = max(top1, key=lambda p: p[1])[0]
    return top5.get(step)


def curve_mean_top1(run: dict) -> float | None:
    """Mean validation top-1 over the run's epochs: the area under its curve, so arms that all end at
    the same accuracy are still told apart by how early they got there."""
    points = run["scalars"].get("val/top1")
    return mean(v for _, v in points) if points else None


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return mean(values) if values else None


def _arm_order(runs: list[dict]) -> list[str]:
    """Arms by the smallest arm.json "index" seen; arms without one follow, alphabetically."""
    index: dict[str, float] = {}
    for r in runs:
        idx = r.get("index")
        index.setdefault(r["arm"], math.inf)
        if isinstance(idx, (int, float)):
            index[r["arm"]] = min(index[r["arm"]], idx)
    return sorted(index, key=lambda a: (index[a], a))


def summarize(runs: list[dict]) -> list[dict]:
    """One row per arm: model cost, throughput, and top-1/top-5 aggregated over seeds.

    Row keys: arm, n (runs), seeds, params_m, gflops, train_images_per_sec, peak_memory_mb,
    top1_mean, top1_std (sample std, None below 2 seeds), top1_n, curve_mean, curve_std, top5_mean,
    unfinished.
    """
    rows = []
    for arm in _arm_order(runs):
        arm_runs = [r for r in runs if r["arm"] == arm]
        top1 = [v for v in map(best_top1, arm_runs) if v is not None]
        curve = [v for v in map(curve_mean_top1, arm_runs) if v is not None]
        rows.append({
            "arm": arm,
            "n": len(arm_runs),
            "seeds": [r["seed"] for r in arm_runs],
            "params_m": _mean(_last(r, "model/params_m") for r in arm_runs),
            "gflops": _mean(_last(r, "model/gflops") for r in arm_runs),
            "train_images_per_sec": _mean(_last(r, "perf/train_images_per_sec") for r in arm_runs),
            "peak_memory_mb": _mean(_last(r, "perf/peak_memory_mb") for r in arm_runs),
            "top1_mean": mean(top1) if top1 else None,
            "top1_std": stdev(top1) if len(top1) > 1 else None,
            "top1_n": len(top1),
            "curve_mean": mean(curve) if curve else None,
            "curve_std": stdev(curve) if len(curve) > 1 else None,
            "top5_mean": _mean(map(best_top5, arm_runs)),
            "unfinished": sum(r["status"] != "finished" for r in arm_runs),
        })
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return DASH if value is None else format(value, spec)


def markdown_table(rows: list[dict]) -> str:
    """The ablation table as GitHub markdown, one line per arm."""
    header = ["arm", "params (M)", "GFLOPs", "train img/s", "peak mem (MB)", "top-1 (%)",
              "mean val top-1 over epochs (%)", "top-5 (%)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    for r in rows:
        if r["top1_mean"] is None:
            top1 = DASH
        else:
            top1 = f"{r['top1_mean']:.2f} ± {_fmt(r['top1_std'], '.2f')} (n={r['top1_n']})"
        curve = DASH if r["curve_mean"] is None else f"{r['curve_mean']:.2f} ± {_fmt(r['curve_std'], '.2f')}"
        cells = [
            r["arm"].replace("|", "\\|"),  # a pipe would split the cell
            _fmt(r["params_m"], ".2f"),
            _fmt(r["gflops"], ".3g"),
            _fmt(r["train_images_per_sec"], ".0f"),
            _fmt(r["peak_memory_mb"], ".0f"),
            top1,
            curve,
            _fmt(r["top5_mean"], ".2f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plots


def _new_figure(figsize=(6.4, 4.4)):
    # Figure + Agg canvas instead of pyplot: no display needed and no global backend switch
    # for other code in the same process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=110)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def val_top1_by_epoch(run: dict) -> list[tuple[float, float]]:
    """(epoch, val top-1) pairs; epoch from the ``epoch`` scalar at the same step."""
    epochs = run["scalars"].get("epoch", [])
    epoch_at = dict(epochs)
    out = []
    for i, (step, value) in enumerate(run["scalars"].get("val/top1", [])):
        epoch = epoch_at.get(step)
        if epoch is None:  # no exact match: latest epoch logged before, else the val index
            before = [e for s, e in epochs if s <= step]
            epoch = before[-1] if before else float(i)
        out.append((epoch, value))
    return out


def plot_curves(runs: list[dict], path) -> Path:
    """Validation top-1 per epoch, one line per arm (mean over seeds, min-max band)."""
    fig, ax = _new_figure()
    plotted = False
    for arm in _arm_order(runs):
        per_epoch: dict[float, list[float]] = {}
        for r in (r for r in runs if r["arm"] == arm):
            for epoch, value in val_top1_by_epoch(r):
                per_epoch.setdefault(round(epoch, 6), []).append(value)
        if not per_epoch:
            continue
        xs = sorted(per_epoch)
        (line,) = ax.plot(xs, [mean(per_epoch[x]) for x in xs], marker="o", ms=3, label=arm)
        if any(len(v) > 1 for v in per_epoch.values()):
            ax.fill_between(xs, [min(per_epoch[x]) for x in xs], [max(per_epoch[x]) for x in xs],
                            color=line.get_color(), alpha=0.2, linewidth=0)
        plotted = True
    if plotted:
        ax.legend(title="arm", fontsize="small")
    else:
        ax.text(0.5, 0.5, "no val/top1 logged", ha="center", va="center", transform=ax.transAxes)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title("Validation top-1 (mean over seeds, band = min-max)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def plot_acc_vs_gflops(rows: list[dict], path) -> Path:
    """Scatter of GFLOPs vs top-1 (error bar = std over seeds), each point labelled by arm."""
    fig, ax = _new_figure()
    points = [r for r in rows if r["gflops"] is not None and r["top1_mean"] is not None]
    for r in points:
        ax.errorbar(r["gflops"], r["top1_mean"], yerr=r["top1_std"] or 0.0, fmt="o", capsize=3)
        ax.annotate(r["arm"], (r["gflops"], r["top1_mean"]), textcoords="offset points",
                    xytext=(5, 5), fontsize="small")
    if not points:
        ax.text(0.5, 0.5, "no arm has both GFLOPs and top-1", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("GFLOPs")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("Accuracy vs. compute (error bar = std over seeds)")
    ax.grid(alpha=0.3)
    ax.margins(0.15)  # room for the labels
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


# --------------------------------------------------------------------------- report + CLI

CURVES_PNG = "val_top1_curves.png"
SCATTER_PNG = "top1_vs_gflops.png"


def make_report(ablation_dir, out_dir=None) -> Path:
    """Write report.md and the two PNGs into out_dir (default: ablation_dir); return report.md.

    Raises FileNotFoundError for a missing folder, ValueError if it holds no event files.
    """
    return _write_report(ablation_dir, out_dir)[0]


def _write_report(ablation_dir, out_dir) -> tuple[Path, str, list[str]]:
    """make_report's work; also returns the table and the unfinished runs, so the CLI need not read
    the logs twice."""
    ablation_dir = Path(ablation_dir)
    runs = load_runs(ablation_dir)
    if not runs:
        raise ValueError(f"no TensorBoard event files under {ablation_dir}")
    if not any(r["scalars"].get("val/top1") for r in runs):  # a table of dashes is no report
        raise ValueError(f"no run under {ablation_dir} has validated yet ({len(runs)} runs, none with val/top1)")
    out = Path(out_dir) if out_dir is not None else ablation_dir
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; allowed: a folder (created if missing)")
    out.mkdir(parents=True, exist_ok=True)

    rows = summarize(runs)
    table = markdown_table(rows)
    plot_curves(runs, out / CURVES_PNG)
    plot_acc_vs_gflops(rows, out / SCATTER_PNG)

    name = runs[0]["ablation"]
    unfinished = [f"{r['arm']}/seed_{r['seed']} ({r['status']})" for r in runs
                  if r["status"] != "finished"]
    text = "\n".join([
        f"# Ablation report: {name}",
        "",
        "Top-1: best validation top-1 per seed, mean ± sample std over seeds. Mean val top-1 over "
        "epochs: the area under each seed's validation curve (how early an arm learns), mean ± std. "
        "GFLOPs count a multiply-add as one.",
        "",
        table,
        f"![validation top-1 per epoch]({CURVES_PNG})",
        "",
        f"![top-1 vs GFLOPs]({SCATTER_PNG})",
        "",
        f"Read {len(runs)} runs ({len(rows)} arms, "
        f"{sum(r['n_event_files'] for r in runs)} event files) from `{ablation_dir}`; "
        f"unfinished: {', '.join(unfinished) if unfinished else 'none'}.",
        "",
    ])
    path = out / "report.md"
    path.write_text(text, encoding="utf-8")
    return path, table, unfinished


def main(argv: list[str] | None = None) -> int:
    """CLI: ``report <ablation_dir> [--out DIR]`` (argv excludes the subcommand name)."""
    parser = argparse.ArgumentParser(prog="cli.py report", description=__doc__.splitlines()[0])
    parser.add_argument("ablation_dir", type=folder_arg, help="runs/<ablation> folder")
    parser.add_argument("--out", type=folder_arg, default=None, help="output folder (default: ablation_dir)")
    args = parser.parse_args(argv)
    try:
        path, table, unfinished = _write_report(args.ablation_dir, args.out)
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        return report_storage_error(e, " (write the report elsewhere with --out DIR)")
    print(table, end="")
    if unfinished:
        print(f"note: unfinished runs (their rows show what they logged so far): {', '.join(unfinished)}",
              file=sys.stderr)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
