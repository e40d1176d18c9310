"""The benchmark driver and the unattended GPU check script, run without a GPU (stubs, tiny cases)."""
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash, timeout")
@pytest.mark.parametrize("total_s", [540, 120, 40])
def test_gpu_check_model_cases_have_a_limit_inside_their_step(tmp_path, total_s):
    """A model case cut by bench.py's --case_timeout keeps its training numbers (the driver records
    them); cut by the step's own `timeout`, the driver dies with it and the step records nothing.
    So every whole-model step needs a case limit below its step limit, leaving room for the cases
    before it (the eager model before the compiled one)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir / "nvidia-smi", "echo 'FAKE GPU, 80000 MiB, 0'")
    _stub(bin_dir / "fakepy", "exit 0")
    out = tmp_path / "out"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PY=str(bin_dir / "fakepy"), OUT=str(out),
               TOTAL_S=str(total_s))
    subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], cwd=REPO, env=env,
                   capture_output=True, text=True, timeout=60)
    model_steps = 0
    for log in sorted(out.glob("*.log")):
        first = log.read_text().splitlines()[0]
        m = re.match(r"== (\S+) \(limit (\d+)s\): (.*)", first)
        if not m or "--what models" not in m.group(3):
            continue
        model_steps += 1
        name, limit, cmd = m.group(1), int(m.group(2)), m.group(3)
        t = re.search(r"--case_timeout (\d+)", cmd)
        assert t, f"{name}: no --case_timeout ({cmd})"
        room = 25 if "--compile" in cmd else 3  # the compiled case runs after an eager one
        assert 0 < int(t.group(1)) <= limit - room, f"{name}: case limit {t.group(1)} s in a {limit} s step"
    assert model_steps == 3


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash, timeout")
def test_gpu_check_ends_within_total_even_if_a_step_ignores_sigterm(tmp_path):
    """The run is cut from outside at its limit (TOTAL_S): the script must end before it even when a
    step's process does not exit on the step limit's SIGTERM (a process stuck in a driver call, a
    library's signal handler), so the remaining steps' skips and the exit status are still written."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir / "nvidia-smi", "echo 'FAKE GPU, 80000 MiB, 0'")
    _stub(bin_dir / "fakepy", 'case "$*" in *"-c "*) exit 0;; esac\ntrap "" TERM\nsleep 300')
    out = tmp_path / "out"
    total = 30
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PY=str(bin_dir / "fakepy"), OUT=str(out),
               TOTAL_S=str(total))
    proc = subprocess.Popen(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        rc = proc.wait(timeout=total)
    except subprocess.TimeoutExpired:  # the session holds the script and every step's process group
        subprocess.run(["pkill", "-KILL", "-s", str(proc.pid)])
        proc.wait()
        pytest.fail(f"gpu_check.sh still running after TOTAL_S={total} s")
    assert rc == 1
    assert "skipped" in (out / "bench_layers.log").read_text()


def test_layer_cases_in_one_process_see_the_same_input_and_weights(monkeypatch):
    """On CUDA the layer cases share one process (bench.in_process): every case must still get the same
    input and initial weights, as the per-case subprocesses (seeded) do on CPU."""
    import sys
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench
    import biformer_lit.attention as attention

    seen = []
    create = attention.create_attention

    def recording(*args, **kwargs):
        m = create(*args, **kwargs)
        m.register_forward_pre_hook(lambda mod, inp: seen.append((inp[0].detach().clone(), mod.qkv.weight.detach().clone())))
        return m

    monkeypatch.setattr(attention, "create_attention", recording)
    case = dict(device="cpu", batch=1, h=4, w=4, c=8, heads=2, n_win=2, topk=1, repeats=1, kind="bra", label="bra")
    for backend in ("indexed", "masked"):
        r = bench.in_process(dict(case, backend=backend))
        assert "error" not in r, r
    first, last = seen[0], seen[-1]
    assert torch.equal(first[0], last[0]) and torch.equal(first[1], last[1])


def test_timed_is_the_median(monkeypatch):
    """bench.timed reports the median of its repeats; with an even count (--quick models: 2) that is the
    mean of the middle two, not the slower one."""
    import sys
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench

    clock = iter([0.0, 1.0, 10.0, 13.0])  # two runs: 1 s and 3 s
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
    assert bench.timed(lambda: None, "cpu", 2) == 2.0
