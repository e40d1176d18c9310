"""An ablation's TensorBoard logs -> a report: each arm against the reference arm (a paired difference with a
95% interval over seeds, n and a verdict), a table, and two plots.

Layout read: runs/<ablation>/<arm>/seed_<n>/ holding events.out.tfevents.*, arm.json (the runner's status file)
and, in sub-folders, evaluations (left out). Event files are read record by record with their checksums: a
truncated or corrupt file is named and its run counted as damaged, never shown as a result. So is a finished run
without its end-of-fit summary. The statistics are biformer_lit.stats (why a paired t interval: see there).
"""
from __future__ import annotations

import json
import math
import re
import struct
from collections import Counter
from pathlib import Path
from statistics import mean, stdev

from .errors import UserError
from .stats import CONFIDENCE, POWER, Contrast, paired

EVENT_GLOB = "events.out.tfevents.*"
DASH = "—"
_SEED_DIR = re.compile(r"^seed_(\d+)$")
SUMMARY_TAG = "best/val_top1"  # logged once at the end of a fit (callbacks.RunStats)
METRICS = {"best top-1": "best_top1", "area under the validation curve": "curve_mean_top1"}


# --------------------------------------------------------------------------- reading


def read_events(path: Path) -> tuple[dict[str, list[tuple[int, float, float]]], str | None]:
    """The scalars of one event file, {tag: [(step, value, wall_time), ...]} in write order, and what is wrong
    with the file (None if nothing): records are checked against their CRCs, so a truncated or corrupt file is
    noticed instead of read as a shorter run."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    data, pos, scalars = path.read_bytes(), 0, {}
    while pos < len(data):
        if len(data) - pos < 12:
            return scalars, f"truncated at byte {pos} of {len(data)}"
        (length,), (crc,) = struct.unpack_from("<Q", data, pos), struct.unpack_from("<I", data, pos + 8)
        if masked_crc32c(data[pos:pos + 8]) != crc:
            return scalars, f"corrupt record header at byte {pos}"
        end = pos + 12 + length + 4
        if end > len(data):
            return scalars, f"truncated at byte {pos} of {len(data)} (a record of {length} bytes)"
        body = data[pos + 12:end - 4]
        if masked_crc32c(body) != struct.unpack_from("<I", data, end - 4)[0]:
            return scalars, f"corrupt record at byte {pos}"
        event = Event.FromString(body)
        for value in event.summary.value:
            if value.HasField("simple_value"):
                scalars.setdefault(value.tag, []).append((int(event.step), float(value.simple_value), event.wall_time))
        pos = end
    return scalars, None


def _run_root(event_dir: Path, top: Path) -> Path:
    """The folder that identifies a run: nearest ancestor with arm.json or named seed_<n>, so that event files in
    its sub-folders (an evaluation's) belong to it instead of counting as extra seeds."""
    for d in [event_dir, *event_dir.parents]:
        if (d / "arm.json").is_file() or _SEED_DIR.match(d.name):
            return d
        if d == top:
            break
    return event_dir


def _evaluation(scalars: dict) -> bool:
    """An event file of `validate` / `test`: Lightning logs them at step 0 (its logger adds `epoch` to every point),
    since they don't restore the training step; a fit logs past step 0."""
    return "epoch" in scalars and {p[0] for points in scalars.values() for p in points} == {0}


def _merge(per_file: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """One run's fit files merged; a resumed run appends a newer file, so files go in the order of their first
    wall time and for a step logged more than once the latest value wins."""
    def first_time(scalars: dict) -> float:
        return min((p[2] for points in scalars.values() for p in points), default=math.inf)

    merged: dict[str, dict[int, float]] = {}
    for scalars in sorted(per_file, key=first_time):
        for tag, points in scalars.items():
            merged.setdefault(tag, {}).update({step: value for step, value, _ in points})
    return {tag: sorted(by_step.items()) for tag, by_step in merged.items()}


def _read_arm_json(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:  # the bare JSON message named no file
        raise UserError(f"{path} is not valid JSON ({e}); allowed: the runner's status file (a JSON object): "
                        f"fix or delete it") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path} holds a {type(meta).__name__}; allowed: the runner's status file (a JSON object): "
                        f"fix or delete it")
    return meta


def load_runs(ablation_dir) -> list[dict]:
    """Every run below `ablation_dir` (any depth), sorted by (arm, seed). Each: ablation, arm, seed, index,
    status, reference, path, files, scalars {tag: [(step, value), ...]} and damaged (what is wrong, file by file;
    empty for a sound run)."""
    top = Path(ablation_dir)
    if top.exists() and not top.is_dir():
        raise UserError(f"{top} is a file; allowed: the ablation's folder (runs/<ablation>)")
    if not top.is_dir():
        raise UserError(f"no such ablation folder: {top}")
    groups: dict[Path, list[Path]] = {}
    for f in sorted(top.rglob(EVENT_GLOB)):
        if f.is_file():
            groups.setdefault(_run_root(f.parent, top), []).append(f)
    runs = []
    for root, files in groups.items():
        meta = _read_arm_json(root / "arm.json") if (root / "arm.json").is_file() else {}
        read = [(f, *read_events(f)) for f in files]
        fits = [(f, scalars, problem) for f, scalars, problem in read if not _evaluation(scalars)]
        scalars = _merge([s for _, s, _ in fits])
        status = meta.get("status") or ("finished" if SUMMARY_TAG in scalars else "unknown")
        damaged = [f"{f}: {problem}" for f, _, problem in fits if problem and status != "running"]
        if status == "finished" and SUMMARY_TAG not in scalars:
            damaged.append(f"{root}: finished, but no end-of-fit summary ({SUMMARY_TAG}) in its event files")
        m = _SEED_DIR.match(root.name)
        runs.append({
            "ablation": meta.get("ablation", top.name), "arm": str(meta.get("arm") or (root.parent.name if m else
                                                                                      root.name)),
            "seed": meta.get("seed", int(m.group(1)) if m else None), "index": meta.get("index"), "status": status,
            "reference": meta.get("reference"), "path": root, "files": len(files), "scalars": scalars,
            "damaged": damaged,
        })
    runs.sort(key=lambda r: (r["arm"], r["seed"] if r["seed"] is not None else -1))
    return runs


# --------------------------------------------------------------------------- summarising


def _last(run: dict, tag: str) -> float | None:
    points = run["scalars"].get(tag)
    return points[-1][1] if points else None


def best_top1(run: dict) -> float | None:
    """Best validation top-1: the logged summary, else the best of val/top1 so far."""
    best = _last(run, SUMMARY_TAG)
    if best is not None:
        return best
    points = run["scalars"].get("val/top1")
    return max(v for _, v in points) if points else None


def best_top5(run: dict) -> float | None:
    """Top-5 of the best top-1's validation (the checkpoint best-* keeps)."""
    best = _last(run, "best/val_top5")
    if best is not None:
        return best
    top1, top5 = run["scalars"].get("val/top1"), dict(run["scalars"].get("val/top5", []))
    return top5.get(max(top1, key=lambda p: p[1])[0]) if top1 and top5 else None


def curve_mean_top1(run: dict) -> float | None:
    """Mean validation top-1 over the run's epochs: the area under its curve, so arms that end at the same
    accuracy are still told apart by how early they got there."""
    points = run["scalars"].get("val/top1")
    return mean(v for _, v in points) if points else None


def arm_order(runs: list[dict]) -> list[str]:
    """Arms in the order of the ablation section (arm.json "index"); arms without one follow, alphabetically."""
    index: dict[str, float] = {}
    for r in runs:
        index.setdefault(r["arm"], math.inf)
        if isinstance(r.get("index"), (int, float)):
            index[r["arm"]] = min(index[r["arm"]], r["index"])
    return sorted(index, key=lambda a: (index[a], a))


def sound(runs: list[dict]) -> list[dict]:
    """The runs whose numbers are results: not damaged."""
    return [r for r in runs if not r["damaged"]]


def num_classes(runs: list[dict]) -> int | None:
    found = Counter(int(v) for r in runs if (v := _last(r, "data/num_classes")) is not None)
    return found.most_common(1)[0][0] if found else None


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return mean(values) if values else None


def summarize(runs: list[dict]) -> list[dict]:
    """One row per arm over its sound runs: cost, speed, and best top-1 / area under the curve / top-5 over seeds
    (mean, sample std, n); unfinished and damaged counts."""
    rows = []
    for arm in arm_order(runs):
        all_runs = [r for r in runs if r["arm"] == arm]
        mine = sound(all_runs)
        top1 = [v for v in map(best_top1, mine) if v is not None]
        curve = [v for v in map(curve_mean_top1, mine) if v is not None]
        rows.append({
            "arm": arm, "seeds": [r["seed"] for r in mine],
            "params_m": _mean(_last(r, "model/params_m") for r in mine),
            "gmacs": _mean(_last(r, "model/gmacs") for r in mine),
            "train_images_per_sec": _mean(_last(r, "perf/train_images_per_sec") for r in mine),
            "peak_memory_mb": _mean(_last(r, "perf/peak_train_memory_mb") for r in mine),
            "cuda": any(_last(r, "perf/cuda") for r in mine),
            "top1_mean": mean(top1) if top1 else None, "top1_std": stdev(top1) if len(top1) > 1 else None,
            "top1_n": len(top1),
            "curve_mean": mean(curve) if curve else None, "curve_std": stdev(curve) if len(curve) > 1 else None,
            "top5_mean": _mean(map(best_top5, mine)),
            "unfinished": sum(r["status"] != "finished" for r in mine), "damaged": len(all_runs) - len(mine),
        })
    return rows


def reference_arm(runs: list[dict]) -> str:
    """The arm the others are compared with: the ablation section's `reference` (in arm.json), else the first."""
    named = [r["reference"] for r in runs if r.get("reference")]
    return named[0] if named and named[0] in {r["arm"] for r in runs} else arm_order(runs)[0]


def contrasts(runs: list[dict]) -> dict[str, dict[str, Contrast | None]]:
    """{arm: {metric: arm - reference, paired by seed over finished sound runs}} for every arm but the reference."""
    done = [r for r in sound(runs) if r["status"] == "finished"]
    ref = reference_arm(runs)

    def by_seed(arm: str, metric: str) -> dict[int, float]:
        fn = globals()[METRICS[metric]]
        return {r["seed"]: v for r in done if r["arm"] == arm and (v := fn(r)) is not None}
    return {arm: {m: paired(by_seed(ref, m), by_seed(arm, m)) for m in METRICS}
            for arm in arm_order(runs) if arm != ref}


def _signed(x: float) -> str:
    return f"{x:+.2f}"


def verdict(metric: str, c: Contrast | None) -> str:
    if c is None:
        return f"{metric}: no finished seed in common with the reference"
    if c.n == 1:
        return (f"{metric} {_signed(c.difference)} points, n=1: no uncertainty can be given with one seed; add seeds "
                f"with --ablation.seeds=[0,1,2] (finished seeds are skipped)")
    ci = f"[{_signed(c.low)}, {_signed(c.high)}]"
    if c.separable:
        return f"{metric} {_signed(c.difference)} points, {CONFIDENCE:.0%} CI {ci}, n={c.n}: separable at {CONFIDENCE:.0%}"
    need = c.seeds_needed
    if need is None:
        more = "no difference seen"
    else:
        count = f"about {need}" if need <= 1000 else "more than 1000"
        more = f"{count} seeds would separate a difference of this size ({POWER:.0%} power, with this spread)"
    return f"{metric} {_signed(c.difference)} points, {CONFIDENCE:.0%} CI {ci}, n={c.n}: not separable at " \
           f"{CONFIDENCE:.0%}; {more}"


def verdict_lines(runs: list[dict]) -> list[str]:
    """One line per (arm, metric): the arm against the reference arm (none without runs)."""
    if not runs:
        return []
    ref = reference_arm(runs)
    return [f"{arm} vs {ref}: {verdict(metric, c)}" for arm, by_metric in contrasts(runs).items()
            for metric, c in by_metric.items()]


# --------------------------------------------------------------------------- the table


def _fmt(value: float | None, spec: str) -> str:
    return DASH if value is None else format(value, spec)


def _spread(m: float | None, sd: float | None, n: int | None = None) -> str:
    if m is None:
        return DASH
    return f"{m:.2f} ± {_fmt(sd, '.2f')}" + (f" (n={n})" if n is not None else "")


def markdown_table(rows: list[dict], classes: int | None = None) -> str:
    """The ablation table as GitHub markdown, one line per arm; top-5 only where it can be below 100."""
    top5 = classes is None or classes > 5
    cuda = any(r["cuda"] for r in rows)
    speed = "train img/s" if cuda else "train img/s (indicative)"
    memory = "peak train MB (CUDA allocated)" if cuda else "peak train MB (RSS growth, indicative)"
    header = ["arm", "params (M)", "GMACs", speed, memory, "best top-1 (%)", "area under val curve (%)"]
    header += ["top-5 (%)"] if top5 else []
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    for r in rows:
        note = "".join(f", {r[k]} {k}" for k in ("unfinished", "damaged") if r[k])
        cells = [r["arm"].replace("|", "\\|") + (f" ({note[2:]})" if note else ""), _fmt(r["params_m"], ".2f"),
                 _fmt(r["gmacs"], ".3g"), _fmt(r["train_images_per_sec"], ".0f"), _fmt(r["peak_memory_mb"], ".0f"),
                 _spread(r["top1_mean"], r["top1_std"], r["top1_n"]), _spread(r["curve_mean"], r["curve_std"])]
        cells += [_fmt(r["top5_mean"], ".2f")] if top5 else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plots


def _new_figure(figsize=(6.4, 4.4)):
    # Figure + Agg canvas instead of pyplot: no display needed and no global backend switch
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=110)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def val_top1_by_epoch(run: dict) -> list[tuple[float, float]]:
    """(epoch, val top-1) pairs; epoch from the `epoch` scalar at the same step."""
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


def _chance_line(ax, chance: float | None) -> None:
    if chance is not None:
        ax.axhline(chance, color="grey", ls="--", lw=1, label=f"chance ({chance:.3g}%)")


def plot_curves(runs: list[dict], path, chance: float | None = None) -> Path:
    """Validation top-1 per epoch, one line per arm (mean over seeds, min-max band)."""
    fig, ax = _new_figure()
    for arm in arm_order(runs):
        per_epoch: dict[float, list[float]] = {}
        for r in (r for r in sound(runs) if r["arm"] == arm):
            for epoch, value in val_top1_by_epoch(r):
                per_epoch.setdefault(round(epoch, 6), []).append(value)
        if not per_epoch:
            continue
        xs = sorted(per_epoch)
        (line,) = ax.plot(xs, [mean(per_epoch[x]) for x in xs], marker="o", ms=3, label=arm)
        if any(len(v) > 1 for v in per_epoch.values()):
            ax.fill_between(xs, [min(per_epoch[x]) for x in xs], [max(per_epoch[x]) for x in xs],
                            color=line.get_color(), alpha=0.2, linewidth=0)
    _chance_line(ax, chance)
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="epoch", ylabel="validation top-1 (%)", title="Validation top-1 (mean over seeds, band = min-max)",
           ylim=(0, 100))
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def plot_top1_vs_gmacs(runs: list[dict], path, chance: float | None = None) -> Path:
    """Best top-1 against GMACs: every seed a point, the arm's mean a bar; the axis runs from 0 (chance drawn)
    to 100, so seed noise is not mistaken for a trend."""
    fig, ax = _new_figure()
    for arm in arm_order(runs):
        mine = [r for r in sound(runs) if r["arm"] == arm]
        points = [(g, t) for r in mine if (g := _last(r, "model/gmacs")) is not None and (t := best_top1(r)) is not None]
        if not points:
            continue
        (dots,) = ax.plot([g for g, _ in points], [t for _, t in points], "o", alpha=0.6, label=f"{arm} (n={len(points)})")
        ax.plot([mean(g for g, _ in points)], [mean(t for _, t in points)], "_", ms=18, mew=2, color=dots.get_color())
    _chance_line(ax, chance)
    ax.set(xlabel="GMACs per image", ylabel="best validation top-1 (%)", ylim=(0, 100),
           title="Best top-1 against compute (points: seeds; bar: mean)")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    ax.margins(x=0.15)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


# --------------------------------------------------------------------------- the report

CURVES_PNG = "val_top1_curves.png"
SCATTER_PNG = "top1_vs_gmacs.png"


def make_report(ablation_dir, out_dir=None) -> Path:
    """Write report.md and the two PNGs into out_dir (default: ablation_dir); return report.md."""
    return write_report(ablation_dir, out_dir)[0]


def write_report(ablation_dir, out_dir=None) -> tuple[Path, str, list[str]]:
    """make_report's work; also returns what to print (verdicts and table) and the notes for the terminal."""
    ablation_dir = Path(ablation_dir)
    runs = load_runs(ablation_dir)
    if not runs:
        raise UserError(f"no TensorBoard event files under {ablation_dir}")
    if not any(r["scalars"].get("val/top1") for r in sound(runs)):  # a table of dashes is no report
        raise UserError(f"no sound run under {ablation_dir} has validated yet ({len(runs)} runs)")
    out = Path(out_dir) if out_dir is not None else ablation_dir
    out.mkdir(parents=True, exist_ok=True)
    classes = num_classes(runs)
    chance = 100.0 / classes if classes else None
    rows = summarize(runs)
    table = markdown_table(rows, classes)
    verdicts = verdict_lines(runs)
    plot_curves(runs, out / CURVES_PNG, chance)
    plot_top1_vs_gmacs(runs, out / SCATTER_PNG, chance)
    unfinished = [f"{r['arm']}/seed_{r['seed']} ({r['status']})" for r in sound(runs) if r["status"] != "finished"]
    damaged = [d for r in runs for d in r["damaged"]]
    task = f"{classes} classes, chance {chance:.3g}%" if classes else "number of classes not logged"
    seeds = sorted({len(r["seeds"]) for r in rows})
    text = "\n".join([
        f"# Ablation report: {runs[0]['ablation']}",
        "",
        f"{task}; {'-'.join(map(str, seeds))} seed(s) per arm; reference arm: {reference_arm(runs)}.",
        "",
        "## Verdicts",
        "",
        f"Each arm minus the reference, paired by seed: the mean difference in best validation top-1 and in the area "
        f"under the validation curve (mean top-1 over epochs: how early an arm learns), with its {CONFIDENCE:.0%} "
        f"paired-t interval over seeds (few seeds: see biformer_lit/stats.py for why not a bootstrap).",
        "",
        *[f"- {line}" for line in verdicts],
        "",
        "## Table",
        "",
        "Mean ± sample std over seeds. GMACs: multiply-accumulates per image at the training size (attention and "
        "routing included). Speed and memory: a timed pass of training steps after warm-up (no validation, no "
        "start-up); on a shared CPU only indicative, compare arms within one run.",
        "",
        table,
        f"![validation top-1 per epoch]({CURVES_PNG})",
        "",
        f"![top-1 vs GMACs]({SCATTER_PNG})",
        "",
        f"Read {len(runs)} runs ({sum(r['files'] for r in runs)} event files) from `{ablation_dir}`; "
        f"unfinished: {', '.join(unfinished) or 'none'}; damaged (left out): {'; '.join(damaged) or 'none'}.",
        "",
    ])
    path = out / "report.md"
    path.write_text(text, encoding="utf-8")
    notes = [f"damaged, left out: {d}" for d in damaged]
    notes += [f"unfinished runs (their rows show what they logged so far): {', '.join(unfinished)}"] if unfinished else []
    printed = f"{task}; reference arm {reference_arm(runs)}\n" + "".join(f"{v}\n" for v in verdicts) + "\n" + table
    return path, printed, notes
