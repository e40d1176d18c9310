"""biformer_lit.report on a small runs folder of real TensorBoard event files."""
import json
import math

import pytest
from matplotlib.image import imread
from torch.utils.tensorboard import SummaryWriter

from biformer_lit import report

STEPS_PER_EPOCH = 10
# Validation top-1 per epoch; top-5 is always top-1 + 20.
VAL = {
    ("window", 0): [40.0, 55.0, 61.0],
    ("window", 1): [38.0, 57.0, 56.0],  # still running: no end-of-fit tags
    ("brsa", 0): [45.0, 60.0, 66.0],  # no arm.json: arm/seed from the path
    ("brsa", 1): [44.0, 62.0, 65.5],  # resumed: epochs 0-1 in one file, 1-2 in a second
}
COST = {"window": (10.0, 2.0), "brsa": (12.5, 2.3)}  # params (M), GFLOPs
PERF = {("window", 0): (1000.0, 3000.0), ("brsa", 0): (800.0, 3500.0), ("brsa", 1): (820.0, 3700.0)}
INDEX = {"window": 0, "brsa": 1}  # arm.json order differs from alphabetical on purpose


def _log_epochs(w, top1s, epochs):
    for epoch in epochs:
        step = STEPS_PER_EPOCH * (epoch + 1) - 1
        for s in range(step - STEPS_PER_EPOCH + 1, step + 1, 5):  # a few training points
            w.add_scalar("train/loss", 3.0 - 0.01 * s, s)
            w.add_scalar("train/lr", 1e-3, s)
            w.add_scalar("train/images_per_sec", 900.0, s)
            w.add_scalar("epoch", float(epoch), s)
        w.add_scalar("val/top1", top1s[epoch], step)
        w.add_scalar("val/top5", top1s[epoch] + 20, step)
        w.add_scalar("val/loss", 1.0, step)
        w.add_scalar("epoch", float(epoch), step)


def _log_end(w, arm, seed, top1s):
    step = STEPS_PER_EPOCH * len(top1s) - 1
    w.add_scalar("model/params_m", COST[arm][0], step)
    w.add_scalar("model/gflops", COST[arm][1], step)
    w.add_scalar("perf/train_images_per_sec", PERF[arm, seed][0], step)
    w.add_scalar("perf/peak_memory_mb", PERF[arm, seed][1], step)
    w.add_scalar("best/val_top1", max(top1s), step)
    w.add_scalar("best/val_top5", max(top1s) + 20, step)
    w.add_scalar("hp_metric", -1.0, step)  # unknown tag, must be ignored


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs") / "attn"
    for (arm, seed), top1s in VAL.items():
        d = root / arm / f"seed_{seed}"
        d.mkdir(parents=True)
        (d / "hparams.yaml").write_text("lr: 0.001\n")
        if (arm, seed) != ("brsa", 0):
            status = "running" if (arm, seed) == ("window", 1) else "finished"
            (d / "arm.json").write_text(json.dumps({
                "ablation": "attn", "arm": arm, "seed": seed, "index": INDEX[arm],
                "overrides": {"model.attn": arm}, "status": status}))
        if (arm, seed) == ("brsa", 1):
            with SummaryWriter(d) as w:  # first attempt; its epoch-1 value is stale
                _log_epochs(w, [top1s[0], 10.0], [0, 1])
            with SummaryWriter(d) as w:  # resumed run re-logs epoch 1, then finishes
                _log_epochs(w, top1s, [1, 2])
                _log_end(w, arm, seed, top1s)
            continue
        with SummaryWriter(d) as w:
            _log_epochs(w, top1s, range(3))
            if (arm, seed) != ("window", 1):
                _log_end(w, arm, seed, top1s)
    return root


def test_load_runs(ablation):
    runs = report.load_runs(ablation)
    assert [(r["arm"], r["seed"]) for r in runs] == [("brsa", 0), ("brsa", 1), ("window", 0), ("window", 1)]
    by = {(r["arm"], r["seed"]): r for r in runs}
    assert by["brsa", 1]["n_event_files"] == 2
    # Merged: all three epochs, the re-logged step keeps the newer value.
    assert [v for _, v in by["brsa", 1]["scalars"]["val/top1"]] == VAL["brsa", 1]
    assert [e for e, _ in report.val_top1_by_epoch(by["brsa", 1])] == [0.0, 1.0, 2.0]
    assert by["window", 1]["status"] == "running"
    assert by["brsa", 0]["status"] == "finished"  # inferred from best/val_top1
    assert by["window", 0]["overrides"] == {"model.attn": "window"}


def test_summarize(ablation):
    rows = report.summarize(report.load_runs(ablation))
    assert [r["arm"] for r in rows] == ["window", "brsa"]  # arm.json index order
    window, brsa = rows
    assert (window["n"], brsa["n"]) == (2, 2)
    assert (window["params_m"], window["gflops"]) == pytest.approx(COST["window"])
    assert (brsa["params_m"], brsa["gflops"]) == pytest.approx(COST["brsa"])
    # Only the finished window seed logged perf; brsa averages both seeds.
    assert window["train_images_per_sec"] == pytest.approx(1000.0)
    assert brsa["train_images_per_sec"] == pytest.approx(810.0)
    assert brsa["peak_memory_mb"] == pytest.approx(3600.0)
    # window seed 1 has no best/val_top1: max of val/top1 = 57 (top-5 at that epoch: 77).
    assert window["top1_mean"] == pytest.approx((61.0 + 57.0) / 2)
    assert window["top1_std"] == pytest.approx(abs(61.0 - 57.0) / math.sqrt(2))
    assert window["top5_mean"] == pytest.approx((81.0 + 77.0) / 2)
    assert brsa["top1_mean"] == pytest.approx((66.0 + 65.5) / 2)
    assert brsa["top1_std"] == pytest.approx(0.5 / math.sqrt(2))
    assert (window["unfinished"], brsa["unfinished"]) == (1, 0)


def test_markdown_table(ablation):
    runs = report.load_runs(ablation)
    lines = report.markdown_table(report.summarize(runs)).splitlines()
    assert lines[0] == ("| arm | params (M) | GFLOPs | train img/s | peak mem (MB) | top-1 (%) | "
                        "mean val top-1 over epochs (%) | top-5 (%) |")
    # curve means: window (40+55+61)/3 = 52, (38+57+56)/3 = 50.33; brsa 57, 57.17
    assert lines[2] == "| window | 10.00 | 2 | 1000 | 3000 | 59.00 ± 2.83 (n=2) | 51.17 ± 1.18 | 79.00 |"
    assert lines[3] == "| brsa | 12.50 | 2.3 | 810 | 3600 | 65.75 ± 0.35 (n=2) | 57.08 ± 0.12 | 85.75 |"
    # One seed: no std; a running run without end-of-fit tags shows dashes.
    one = report.markdown_table(report.summarize([r for r in runs if (r["arm"], r["seed"]) == ("window", 1)]))
    assert one.splitlines()[2] == "| window | — | — | — | — | 57.00 ± — (n=1) | 50.33 ± — | 77.00 |"


def test_make_report_and_cli(ablation, tmp_path, capsys):
    out = tmp_path / "out"
    path = report.make_report(ablation, out)
    assert path == out / "report.md"
    text = path.read_text()
    assert text.startswith("# Ablation report: attn")
    assert "| brsa | 12.50 |" in text
    assert f"]({report.CURVES_PNG})" in text and f"]({report.SCATTER_PNG})" in text
    assert "Read 4 runs" in text and "unfinished: window/seed_1 (running)" in text
    for name in (report.CURVES_PNG, report.SCATTER_PNG):
        png = out / name
        assert png.stat().st_size > 5000
        img = imread(png)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200
        assert img[..., :3].std() > 0.01  # not a blank canvas

    assert report.main([str(ablation), "--out", str(tmp_path / "cli")]) == 0
    captured = capsys.readouterr()
    assert "| window | 10.00 |" in captured.out and str(tmp_path / "cli" / "report.md") in captured.out
    assert captured.err == "note: unfinished runs (their rows show what they logged so far): window/seed_1 (running)\n"


@pytest.mark.parametrize("case,message", [("missing", "no such ablation folder"),
                                          ("empty", "no TensorBoard event files"),
                                          ("file", "is a file; give the ablation's folder"),
                                          ("never_validated", "has validated yet (1 runs, none with val/top1)"),
                                          ("out_is_file", "--out"),
                                          # the JSON error named no file; a list was an AttributeError traceback
                                          ("bad_arm_json", "k1/seed_0/arm.json is not valid JSON (Expecting"),
                                          ("list_arm_json", "k1/seed_0/arm.json holds a list; allowed: the "
                                                            "runner's status file (a JSON object)")])
def test_cli_errors(tmp_path, capsys, case, message):
    target = tmp_path / "runs" / "nothing"
    extra = []
    if case == "file":
        target.parent.mkdir(parents=True)
        target.write_text("")
    elif case != "missing":  # exists, but no event files / only training scalars
        target.mkdir(parents=True)
        (target / "arm.json").write_text("{}")
    if case in ("never_validated", "out_is_file", "bad_arm_json", "list_arm_json"):
        with SummaryWriter(target / "k1" / "seed_0") as w:
            w.add_scalar("train/loss", 1.0, 0)
            if case != "never_validated":
                w.add_scalar("val/top1", 50.0, 0)
    if case.endswith("arm_json"):
        (target / "k1" / "seed_0" / "arm.json").write_text('{"arm": "k1",' if case == "bad_arm_json" else "[1]")
    if case == "out_is_file":
        (tmp_path / "afile").write_text("")
        extra = ["--out", str(tmp_path / "afile")]
    assert report.main([str(target), *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert err.startswith("error:") and "\n" not in err and message in err, err
    assert not (target / "report.md").exists()


def test_unwritable_output_is_a_short_error(ablation, tmp_path, capsys, monkeypatch):
    def denied(runs, path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(report, "plot_curves", denied)
    assert report.main([str(ablation), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "error: cannot access " in err and "val_top1_curves.png: Permission denied (write the report elsewhere with --out DIR)" in err


@pytest.mark.parametrize("args", [[""], ["runs/x", "--out", ""]])
def test_an_empty_folder_argument_is_refused(tmp_path, capsys, monkeypatch, args):
    """Path("") is the working folder: `report ""` (a quoted unset variable) read every run below it and wrote
    report.md and the plots there, exit 0."""
    monkeypatch.chdir(tmp_path)
    with SummaryWriter(tmp_path / "runs" / "x" / "k1" / "seed_0") as w:
        w.add_scalar("val/top1", 50.0, 1)
    with pytest.raises(SystemExit) as e:
        report.main(args)
    assert e.value.code == 2 and "empty; allowed: a folder path" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.md")) and not list(tmp_path.glob("*.png"))
