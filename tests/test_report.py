"""biformer_lit.report and biformer_lit.stats on runs folders of real TensorBoard event files with known numbers."""
import json
import math

import pytest
from matplotlib.image import imread
from torch.utils.tensorboard import SummaryWriter

from biformer_lit import report, stats
from biformer_lit.cli import main
from biformer_lit.errors import UserError

STEPS = 10  # per epoch


def write_run(root, arm, seed, top1s, index, classes=8, status="finished", summary=True, reference=None):
    """One arm's seed: validation top-1 per epoch, the end-of-fit summary, arm.json as the runner writes it."""
    d = root / arm / f"seed_{seed}"
    d.mkdir(parents=True)
    (d / "arm.json").write_text(json.dumps({"ablation": root.name, "arm": arm, "seed": seed, "index": index,
                                            "status": status, "reference": reference}))
    with SummaryWriter(d) as w:
        for epoch, top1 in enumerate(top1s):
            step = STEPS * (epoch + 1) - 1
            w.add_scalar("train/loss", 2.0 - 0.1 * epoch, step)
            w.add_scalar("val/top1", top1, step)
            w.add_scalar("val/top5", min(100.0, top1 + 20), step)
            w.add_scalar("epoch", float(epoch), step)
        if summary:
            end = STEPS * len(top1s) - 1
            for tag, value in {"model/params_m": 1.2, "model/gmacs": 0.016 + 0.001 * index, "data/num_classes": classes,
                               "perf/train_images_per_sec": 500.0 + index, "perf/peak_train_memory_mb": 80.0,
                               "perf/cuda": 0.0, "best/val_top1": max(top1s),
                               "best/val_top5": min(100.0, max(top1s) + 20)}.items():
                w.add_scalar(tag, value, end)
    return d


# best top-1 per seed: b - a = +5, +6, +7 (mean 6, sd 1: separable); c - a = +2, -3, +4 (mean 1, sd 3.61)
CURVES = {
    "a": {0: [40.0, 50.0], 1: [42.0, 52.0], 2: [38.0, 48.0]},
    "b": {0: [45.0, 55.0], 1: [48.0, 58.0], 2: [45.0, 55.0]},
    "c": {0: [41.0, 52.0], 1: [40.0, 49.0], 2: [40.0, 52.0]},
}


@pytest.fixture
def ablation(tmp_path):
    root = tmp_path / "runs" / "abl"
    for index, (arm, seeds) in enumerate(CURVES.items()):
        for seed, top1s in seeds.items():
            write_run(root, arm, seed, top1s, index)
    return root


def test_t_quantiles_match_the_tables():
    for df, q in ((1, 12.706), (2, 4.303), (4, 2.776), (10, 2.228), (30, 2.042)):
        assert stats.t_quantile(0.975, df) == pytest.approx(q, abs=1e-3)
    assert stats.t_quantile(0.8, 2) == pytest.approx(1.061, abs=1e-3)
    assert stats.t_cdf(0.0, 5) == pytest.approx(0.5)


def test_paired_contrast_interval_and_seeds_needed():
    c = stats.paired({0: 50.0, 1: 52.0, 2: 48.0}, {0: 55.0, 1: 58.0, 2: 55.0})  # diffs 5, 6, 7
    half = 4.303 * 1.0 / math.sqrt(3)
    assert (c.n, c.difference, c.sd) == (3, pytest.approx(6.0), pytest.approx(1.0))
    assert (c.low, c.high) == (pytest.approx(6.0 - half, abs=1e-3), pytest.approx(6.0 + half, abs=1e-3))
    assert c.separable and c.seeds_needed is None
    unclear = stats.paired({0: 50.0, 1: 52.0, 2: 48.0}, {0: 52.0, 1: 49.0, 2: 52.0})  # diffs 2, -3, 4
    assert not unclear.separable and unclear.low < 0 < unclear.high
    n = unclear.seeds_needed  # (t_.975 + t_.8)(n-1) * sd / sqrt(n) <= |d| first holds at n
    t = lambda k: stats.t_quantile(0.975, k - 1) + stats.t_quantile(0.8, k - 1)  # noqa: E731
    assert t(n) * unclear.sd / math.sqrt(n) <= 1.0 < t(n - 1) * unclear.sd / math.sqrt(n - 1)
    one = stats.paired({0: 50.0}, {0: 53.0, 1: 60.0})  # only seed 0 in common
    assert (one.n, one.difference, one.low, one.separable) == (1, 3.0, None, None)
    assert stats.paired({0: 1.0}, {1: 2.0}) is None


def test_verdicts_against_the_reference_arm(ablation):
    runs = report.load_runs(ablation)
    assert report.reference_arm(runs) == "a"
    lines = report.verdict_lines(runs)
    assert lines[0].startswith("b vs a: best top-1 +6.00 points, 95% CI [+3.52, +8.48], n=3: separable at 95%")
    assert lines[1].startswith("b vs a: area under the validation curve +6.00 points")
    assert lines[2].startswith("c vs a: best top-1 +1.00 points, 95% CI [") and "n=3: not separable at 95%; about " \
        in lines[2] and "seeds would separate a difference of this size (80% power" in lines[2]
    # a declared reference (the ablation section's, in arm.json) wins over the first arm
    info = json.loads((ablation / "c" / "seed_0" / "arm.json").read_text())
    (ablation / "c" / "seed_0" / "arm.json").write_text(json.dumps(dict(info, reference="b")))
    assert report.verdict_lines(report.load_runs(ablation))[0].startswith("a vs b: best top-1 -6.00 points")


def test_one_and_two_seeds(tmp_path):
    root = tmp_path / "one"
    write_run(root, "a", 0, [40.0, 50.0], 0)
    write_run(root, "b", 0, [40.0, 53.0], 1)
    (line, _) = report.verdict_lines(report.load_runs(root))
    assert line == ("b vs a: best top-1 +3.00 points, n=1: no uncertainty can be given with one seed; add seeds "
                    "with --ablation.seeds=[0,1,2] (finished seeds are skipped)")
    write_run(root, "a", 1, [40.0, 52.0], 0)
    write_run(root, "b", 1, [40.0, 54.0], 1)  # diffs 3, 2: mean 2.5, sd 0.707, t(1) = 12.706
    (line, _) = report.verdict_lines(report.load_runs(root))
    half = 12.706 * 0.7071 / math.sqrt(2)
    assert f"95% CI [{2.5 - half:+.2f}, {2.5 + half:+.2f}], n=2: not separable" in line


def test_table_states_classes_and_leaves_out_a_vacuous_top5(ablation, tmp_path):
    runs = report.load_runs(ablation)
    table = report.markdown_table(report.summarize(runs), report.num_classes(runs))
    header, _, a, b, c = table.splitlines()
    assert "top-5" in header and "GMACs" in header and "(indicative)" in header
    assert a.startswith("| a | 1.20 | 0.016 | 500 | 80 | 50.00 ± 2.00 (n=3) | 45.00 ± 2.00 |")
    few = tmp_path / "four"
    for seed in (0, 1):
        write_run(few, "a", seed, [80.0, 100.0], 0, classes=4)
    runs = report.load_runs(few)
    assert "top-5" not in report.markdown_table(report.summarize(runs), report.num_classes(runs))
    path, printed, notes = report.write_report(few, tmp_path / "out4")
    assert "4 classes, chance 25%" in printed and "top-5" not in path.read_text()


def test_a_damaged_event_file_is_named_and_never_a_result(ablation, capsys):
    """An arm's event file cut in half gave top-1 12.30 instead of 14.26, blank params and GFLOPs, and
    "unfinished: none"."""
    events = next((ablation / "b" / "seed_2").glob("events.out.tfevents.*"))
    events.write_bytes(events.read_bytes()[: events.stat().st_size // 2])
    runs = report.load_runs(ablation)
    (damaged,) = [r for r in runs if r["damaged"]]
    assert (damaged["arm"], damaged["seed"]) == ("b", 2) and str(events) in damaged["damaged"][0]
    assert "truncated" in damaged["damaged"][0]
    row = [r for r in report.summarize(runs) if r["arm"] == "b"][0]
    assert row["top1_n"] == 2 and row["damaged"] == 1 and row["top1_mean"] == pytest.approx(56.5)
    assert ", n=2:" in report.verdict_lines(runs)[0]  # paired over the sound seeds only
    assert main(["report", str(ablation)]) == 0
    err = capsys.readouterr().err
    assert f"note: damaged, left out: {events}" in err
    text = (ablation / "report.md").read_text()
    assert "| b (1 damaged) |" in text and f"damaged (left out): {events}: truncated" in text


def test_a_finished_run_without_its_summary_is_damaged_and_a_running_one_unfinished(tmp_path):
    root = tmp_path / "abl"
    write_run(root, "a", 0, [40.0, 50.0], 0)
    write_run(root, "a", 1, [40.0, 50.0], 0, summary=False)  # "finished", yet the summary never came
    write_run(root, "b", 0, [40.0], 1, status="running", summary=False)
    runs = {(r["arm"], r["seed"]): r for r in report.load_runs(root)}
    assert "no end-of-fit summary" in runs["a", 1]["damaged"][0]
    assert runs["b", 0]["damaged"] == [] and runs["b", 0]["status"] == "running"
    assert "b vs a: best top-1: no finished seed in common with the reference" in report.verdict_lines(list(runs.values()))


def test_report_files_plots_and_the_command(ablation, tmp_path, capsys):
    assert main(["report", str(ablation), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("8 classes, chance 12.5%; reference arm a\nb vs a: best top-1 +6.00")
    assert "| c | 1.20 |" in out and str(tmp_path / "out" / "report.md") in out
    text = (tmp_path / "out" / "report.md").read_text()
    assert text.startswith("# Ablation report: abl") and "8 classes, chance 12.5%; 3 seed(s) per arm" in text
    assert "paired-t interval" in text and "unfinished: none; damaged (left out): none" in text
    for name in (report.CURVES_PNG, report.SCATTER_PNG):
        img = imread(tmp_path / "out" / name)
        assert img.ndim == 3 and img.shape[0] > 200 and img[..., :3].std() > 0.01  # not a blank canvas


def test_an_evaluations_event_file_is_left_out(tmp_path):
    """`cli.py validate --config <arm>/config.yaml` logs at step 0: that point joined the arm's curve (and moved its
    area under the curve)."""
    run = write_run(tmp_path / "abl", "k1", 0, [20.0, 30.0], 0)
    with SummaryWriter(run / "validate") as validate:
        validate.add_scalar("val/top1", 90.0, 0)
        validate.add_scalar("epoch", 0.0, 0)
    (r,) = report.load_runs(tmp_path / "abl")
    assert [v for _, v in r["scalars"]["val/top1"]] == [20.0, 30.0] and r["files"] == 2


@pytest.mark.parametrize("case,named", [("missing", "no such ablation folder"),
                                        ("empty", "no TensorBoard event files"),
                                        ("file", "is a file; allowed: a folder"),
                                        ("never_validated", "has validated yet"),
                                        ("out_is_file", "afile is a file"),
                                        ("bad_arm_json", "k1/seed_0/arm.json is not valid JSON"),
                                        ("list_arm_json", "k1/seed_0/arm.json holds a list"),
                                        ("empty_argument", "empty; allowed: a folder path"),  # read "." instead
                                        ("typo", "--outt")])
def test_bad_input_is_one_error_line(tmp_path, capsys, monkeypatch, case, named):
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "runs" / "nothing"
    extra = []
    if case == "file":
        target.parent.mkdir(parents=True)
        target.write_text("")
    elif case not in ("missing", "empty_argument"):
        target.mkdir(parents=True)
    if case in ("never_validated", "out_is_file", "bad_arm_json", "list_arm_json", "empty_argument", "typo"):
        with SummaryWriter(target / "k1" / "seed_0") as w:
            w.add_scalar("train/loss", 1.0, 1)
            if case != "never_validated":
                w.add_scalar("val/top1", 50.0, 1)
    if case.endswith("arm_json"):
        (target / "k1" / "seed_0" / "arm.json").write_text('{"arm": "k1",' if case == "bad_arm_json" else "[1]")
    if case == "out_is_file":
        (tmp_path / "afile").write_text("")
        extra = ["--out", str(tmp_path / "afile")]
    args = [""] if case == "empty_argument" else [str(target), *extra] + (["--outt", "x"] if case == "typo" else [])
    assert main(["report", *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error:") and err.count("\n") == 1 and named in err, err
    assert not list(tmp_path.rglob("report.md")) and not list(tmp_path.rglob("*.png"))


def test_unwritable_output_is_one_error_line(ablation, tmp_path, capsys, monkeypatch):
    def denied(runs, path, chance=None):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(report, "plot_curves", denied)
    assert main(["report", str(ablation), "--out", str(tmp_path / "out")]) == 2
    assert "val_top1_curves.png: Permission denied" in capsys.readouterr().err


def test_library_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such ablation folder"):
        report.load_runs(tmp_path / "nope")
