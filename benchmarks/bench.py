"""Speed and memory of the attention variants and whole models, measured side by side in one run.

    python benchmarks/bench.py                 # CPU: layers + models, table on stdout, JSON in benchmarks/results/
    python benchmarks/bench.py --what layers   # only per-layer
    python benchmarks/bench.py --compile       # also torch.compile'd models
    python benchmarks/bench.py --what models --dtypes bf16 --models biformer_tiny,biformer_stl   # a subset
On a CUDA machine the same command measures on the GPU instead.

fp32 and bf16 autocast (`--dtypes`, default both) are measured in the same process on the same model
and input, repetitions interleaved (fp32, bf16, bf16, fp32, ...), so the bf16/fp32 ratio of a row
compares arms that saw the same machine load. Medians over repetitions.

Every model, and on CPU every layer, runs in its own subprocess, so the peak memory of one cannot
hide in another's: CPU peak = the process's peak resident set minus that of an idle process that
imported the same libraries and built the same inputs. On CUDA the layer cases share one process
(start-up is paid once): peak = torch.cuda.max_memory_allocated, reset before each case.
The JSON is rewritten after every case, so an interrupted run keeps what it measured.
Timings are medians over repeats after warm-up. Absolute numbers on a shared machine are noisy:
compare the ratios within one run.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from biformer_lit.errors import write_text_atomic  # noqa: E402
from biformer_lit.speed import peak_memory_mb  # noqa: E402

# The paper's stage shapes for BiFormer-T at 224x224 (batch 8): (name, H, W, C, heads, n_win, topk)
STAGES = [("stage1 56x56", 56, 56, 64, 2, 7, 1), ("stage2 28x28", 28, 28, 128, 4, 7, 4),
          ("stage3 14x14", 14, 14, 256, 8, 7, 16)]
# the stage-1 map of a 600x500 image, where the original's memory explodes (batch 1)
LARGE = ("600x500 stage1 150x125", 150, 125, 64, 2, 7)


def timed(fn, device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)  # an even count (--quick models: 2) averages the middle two


def timed_interleaved(fns: dict, device, repeats: int) -> dict:
    """Median seconds of each of `fns` (name -> fn), one call of each per round, the order reversed
    every other round so a drift in machine load falls evenly on all arms."""
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(timed(fns[name], device, 1))
    return {name: statistics.median(t) for name, t in times.items()}


def autocast(device, dtype):
    return torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bf16")


def load_avg():
    """The 1-minute load average at the end of a case: how busy the (shared) machine was."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


# --- one case, inside its own process -----------------------------------------------------------------
def run_layer(case):
    from biformer_lit.attention import create_attention
    dev, dtypes = case["device"], case.get("dtypes", ["fp32"])
    torch.manual_seed(0)  # the same input and weights in every case, also where cases share a process (CUDA)
    x = torch.randn(case["batch"], case["h"], case["w"], case["c"], device=dev, requires_grad=True)
    base = peak_memory_mb(torch.device("cpu"))
    if case.get("idle"):
        return dict(peak_mb=0.0, base_mb=base)
    m = create_attention(case["kind"], case["c"], case["heads"], n_win=case["n_win"], topk=case["topk"],
                         backend=case.get("backend", "auto")).to(dev)

    def fwd_bwd(dtype):
        with autocast(dev, dtype):
            y = m(x)
        y.float().sum().backward()

    def fwd(dtype):
        with torch.no_grad(), autocast(dev, dtype):
            m(x)

    for dt in dtypes:  # warm-up (allocations, lazy init, compilation), outside the peak
        fwd_bwd(dt), fwd(dt)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_train = timed_interleaved({dt: (lambda dt=dt: fwd_bwd(dt)) for dt in dtypes}, dev, case["repeats"])
    peak = peak_memory_mb(torch.device(dev))  # of all the arms together
    t_fwd = timed_interleaved({dt: (lambda dt=dt: fwd(dt)) for dt in dtypes}, dev, case["repeats"])
    return dict(arms={dt: dict(fwd_bwd_ms=t_train[dt] * 1e3, fwd_ms=t_fwd[dt] * 1e3) for dt in dtypes},
                peak_mb=peak, base_mb=base, load=load_avg())


def build_model(name):
    import timm
    import biformer_lit.models  # noqa: F401  (registers the BiFormer models with timm)
    if name == "biformer_tiny[original algorithm]":
        return timm.create_model("biformer_tiny", attn_backend="gather")
    if name == "biformer_tiny[flex]":
        return timm.create_model("biformer_tiny", attn_backend="flex")
    return timm.create_model(name)


def run_model(case):
    dev, b, size, dtypes = case["device"], case["batch"], case.get("size", 224), case.get("dtypes", ["fp32"])
    torch.manual_seed(0)
    x = torch.randn(b, 3, size, size, device=dev)
    base = peak_memory_mb(torch.device("cpu"))
    if case.get("idle"):
        return dict(peak_mb=0.0, base_mb=base)
    model = build_model(case["model"]).to(dev)
    y = torch.randint(0, model.num_classes, (b,), device=dev)
    net = torch.compile(model) if case.get("compile") else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step(dtype):
        with autocast(dev, dtype):
            loss = torch.nn.functional.cross_entropy(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def infer(dtype):
        with torch.no_grad(), autocast(dev, dtype):
            net(x)

    model.train()
    for dt in dtypes:  # warm-up (allocations, lazy init, compilation), outside the peak
        train_step(dt)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_train = timed_interleaved({dt: (lambda dt=dt: train_step(dt)) for dt in dtypes}, dev, case["repeats"])
    peak = peak_memory_mb(torch.device(dev))  # of all the arms together
    r = dict(arms={dt: dict(train_img_s=b / t_train[dt]) for dt in dtypes}, peak_mb=peak, base_mb=base,
             params_m=sum(p.numel() for p in model.parameters()) / 1e6, load=load_avg())
    print(json.dumps(r), flush=True)  # the training numbers survive a crash or time-out in the inference part
    model.eval()
    for dt in dtypes:
        infer(dt)  # eval + no_grad: a compiled model recompiles here
    t_inf = timed_interleaved({dt: (lambda dt=dt: infer(dt)) for dt in dtypes}, dev, case["repeats"])
    for dt in dtypes:
        r["arms"][dt]["infer_img_s"] = b / t_inf[dt]
    return dict(r, load=load_avg())


def in_process(case) -> dict:
    import gc
    try:
        return run_model(case) if "model" in case else run_layer(case)
    except Exception as e:  # one failing case (e.g. out of memory) must not end the run
        return dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")
    finally:
        gc.collect()
        try:  # after a kernel fault the CUDA context is broken: this raises too, and must not hide the row
            torch.cuda.empty_cache()
        except Exception:
            pass


def in_subprocess(case) -> dict:
    r = _subprocess(case)
    if "error" in r and any(m in r["stderr_tail"] for m in ("CUDA error", "Triton Error", "illegal memory")):
        # CUDA reports kernel faults asynchronously, at a later call: run it again synchronously so the
        # traceback names the operation that faulted
        again = _subprocess(case, CUDA_LAUNCH_BLOCKING="1")
        r["blocking_stderr_tail"] = again.get("stderr_tail", "(passed when run synchronously)")
    return r


def _last_json(stdout) -> dict:
    lines = (stdout.decode(errors="replace") if isinstance(stdout, bytes) else stdout or "").strip().splitlines()
    return json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}


def _subprocess(case, **env) -> dict:
    cmd = [sys.executable, __file__, "--case", json.dumps(case)]
    try:  # a case time limit keeps this driver alive to record the case and go on to the next
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CASE_TIMEOUT_S,
                              env=dict(os.environ, PYTHONWARNINGS="ignore", **env))
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        return dict(_last_json(e.stdout), error=f"timed out after {CASE_TIMEOUT_S:.0f} s",
                    stderr_tail="\n".join(err.strip().splitlines()[-40:]))
    if proc.returncode:
        lines = proc.stderr.strip().splitlines() or ["failed"]
        return dict(_last_json(proc.stdout), error=lines[-1][:120], stderr_tail="\n".join(lines[-40:]))
    return _last_json(proc.stdout)


# --- the driver --------------------------------------------------------------------------------------
def layer_cases(device, dtypes, quick):
    reps = 3 if quick else 5
    backends = ["indexed", "masked", "gather"] + (["flex"] if device == "cuda" else [])
    for name, h, w, c, heads, n_win, topk in STAGES:
        common = dict(device=device, dtypes=dtypes, batch=8, h=h, w=w, c=c, heads=heads, n_win=n_win,
                      topk=topk, repeats=reps, shape=name)
        for be in backends:
            yield dict(common, kind="bra", backend=be, label=f"bra[{be}]")
        for kind in ["window", "shifted_window", "axial", "dilated", "full"]:
            yield dict(common, kind=kind, label=kind)
    name, h, w, c, heads, n_win = LARGE
    for topk in (1, 4, 16):
        for be in [b for b in backends if b != "masked"]:  # a dense 19k x 19k token mask: not for this size
            yield dict(device=device, dtypes=dtypes, batch=1, h=h, w=w, c=c, heads=heads, n_win=n_win, topk=topk,
                       kind="bra", backend=be, repeats=reps, shape=f"{name} topk={topk}", label=f"bra[{be}]")


CASE_TIMEOUT_S = None  # --case_timeout: seconds per model case (subprocess), None = no limit
MODELS = ["biformer_tiny", "biformer_tiny[original algorithm]", "biformer_stl", "swin_tiny_patch4_window7_224",
          "biformer_cpu_tiny"]
SHAPES = {"biformer_cpu_tiny": (64, 64)}  # (image size, CPU batch): the ablations' model at its own size


def model_names(device) -> list:
    return MODELS + (["biformer_tiny[flex]"] if device == "cuda" else [])  # FlexAttention trains on CUDA only


def model_cases(device, dtypes, quick, compile_, only=None):
    reps = 2 if quick else 3
    batch = 8 if device == "cpu" else 64
    names = model_names(device)
    for name in names if only is None else [n for n in names if n in only]:
        size, b = SHAPES.get(name, (224, batch))
        yield dict(device=device, dtypes=dtypes, model=name, size=size, batch=b if device == "cpu" else batch,
                   repeats=reps)
    if compile_:
        yield dict(device=device, dtypes=dtypes, model="biformer_tiny", batch=batch, repeats=reps, compile=True)


def fmt(v, spec=".1f"):
    return "—" if v is None else format(v, spec)


def arm_cells(r, dtypes, key, spec, speed: bool):
    """One cell per dtype, then each later dtype's speed-up over the first (>1: faster)."""
    vals = [r.get("arms", {}).get(dt, {}).get(key) for dt in dtypes]
    cells = [fmt(v, spec) for v in vals]
    for v in vals[1:]:
        ok = v is not None and vals[0] is not None and v > 0
        cells.append("—" if not ok else f"{(v / vals[0] if speed else vals[0] / v):.2f}x")
    return cells


def row(cells):
    return "| " + " | ".join(cells) + " |"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--what", choices=["layers", "models", "all"], default="all")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd biformer_tiny")
    ap.add_argument("--only", default="", help="per-layer: only variants whose label contains this")
    ap.add_argument("--models", default=None,
                    help=f"comma-separated subset of: {', '.join(MODELS)}, biformer_tiny[flex] (CUDA)")
    ap.add_argument("--dtypes", default=None, help="comma-separated, run in the given order: fp32, bf16 "
                                                   "(default: fp32,bf16, interleaved in one process per case)")
    ap.add_argument("--json", default=None, help="output file (default benchmarks/results/<device>.json)")
    ap.add_argument("--case_timeout", type=float, default=None, help="seconds per model case (default: none)")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global CASE_TIMEOUT_S
    CASE_TIMEOUT_S = args.case_timeout
    if args.case:
        case = json.loads(args.case)
        torch.manual_seed(0)
        print(json.dumps(run_model(case) if "model" in case else run_layer(case)))
        return
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtypes = args.dtypes.split(",") if args.dtypes else ["fp32", "bf16"]
    only_models = args.models.split(",") if args.models else None
    for flag, given, allowed in (("--dtypes", dtypes, ["fp32", "bf16"]),
                                 ("--models", only_models or [], model_names(device))):
        for bad in [g for g in given if g not in allowed]:
            ap.error(f"{flag}: unknown {bad!r} on {device}; allowed: {', '.join(allowed)}")
    info = dict(device=torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
                cpus=os.cpu_count(), torch=torch.__version__, threads=torch.get_num_threads(),
                cpu_capability=torch.backends.cpu.get_cpu_capability())  # bf16 pays only with AVX512-BF16/AMX
    print(f"# {info}")
    results = dict(info=info, layers=[], models=[])
    out = Path(args.json) if args.json else ROOT / "benchmarks" / "results" / f"{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    run = in_subprocess if device == "cpu" else in_process

    if args.what in ("layers", "all"):
        idle = {}
        vs = [f"{d}/{dtypes[0]}" for d in dtypes[1:]]
        head = ["shape", "variant"] + [f"{d} fwd+bwd ms" for d in dtypes] + vs + [f"{d} fwd ms" for d in dtypes] + vs
        print("\n" + row(head + ["peak MB (all arms)", "load"]) + "\n" + row(["---"] * (len(head) + 2)))
        for case in layer_cases(device, dtypes, args.quick):
            if args.only not in case["label"]:
                continue
            key = (case["batch"], case["h"], case["w"], case["c"])
            if device == "cpu" and key not in idle:
                idle[key] = in_subprocess(dict(case, idle=True))["base_mb"]
            r = run(case)
            if "error" not in r and device == "cpu":
                r["peak_mb"] -= idle[key]
            results["layers"].append(dict(case, **r))
            write_text_atomic(out, json.dumps(results, indent=1))  # a kill keeps the earlier cases
            print(row([case["shape"], case["label"]] + arm_cells(r, dtypes, "fwd_bwd_ms", ".1f", False)
                      + arm_cells(r, dtypes, "fwd_ms", ".1f", False) + [fmt(r.get("peak_mb"), ".0f"),
                      fmt(r.get("load"), ".1f")]) + (f" {r['error']}" if "error" in r else ""), flush=True)

    if args.what in ("models", "all"):
        vs = [f"{d}/{dtypes[0]}" for d in dtypes[1:]]
        head = (["model", "input", "compiled", "params (M)"] + [f"{d} train img/s" for d in dtypes] + vs
                + [f"{d} infer img/s" for d in dtypes] + vs + ["peak train MB (all arms)", "load"])
        print("\n" + row(head) + "\n" + row(["---"] * len(head)))
        idle = None
        for case in model_cases(device, dtypes, args.quick, args.compile, only_models):
            if device == "cpu" and idle is None:
                idle = in_subprocess(dict(case, idle=True))["base_mb"]
            r = in_subprocess(case)  # on CUDA too: a crashed kernel cannot poison the next model
            if "error" not in r and device == "cpu":
                r["peak_mb"] -= idle
            results["models"].append(dict(case, **r))
            write_text_atomic(out, json.dumps(results, indent=1))  # a kill keeps the earlier cases
            print(row([case["model"], f"{case['batch']}x{case.get('size', 224)}px",
                       "yes" if case.get("compile") else "no", fmt(r.get("params_m"))]
                      + arm_cells(r, dtypes, "train_img_s", ".2f", True) + arm_cells(r, dtypes, "infer_img_s", ".2f", True)
                      + [fmt(r.get("peak_mb"), ".0f"), fmt(r.get("load"), ".1f")])
                  + (f" {r['error']}" if "error" in r else ""), flush=True)
            if "blocking_stderr_tail" in r:  # the synchronous rerun's traceback: where the kernel faulted
                print("  " + "\n  ".join(r["blocking_stderr_tail"].splitlines()[-8:]), flush=True)

    write_text_atomic(out, json.dumps(results, indent=1))  # a kill keeps the earlier cases
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
