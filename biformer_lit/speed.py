"""Training speed and memory of a model, measured the one way the project measures them: a short timed pass of
training steps (forward, backward, AdamW) on a copy of the model after warm-up, nothing else in between (no
validation, no data loading, no start-up). Used by each run (callbacks.RunStats) so that arms compare.

Memory: on CUDA the allocator's peak (torch.cuda.max_memory_allocated) during the pass; on the CPU the growth of
the process's peak resident memory during the pass (what the pass added on top of the process: activations,
gradients, optimizer state), which other allocations of the process can hide: indicative only.
"""
import copy
import resource
import time
from contextlib import nullcontext

import torch


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: the allocator's peak since the last reset; CPU: the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def training_speed(model: torch.nn.Module, batch_size: int, img_size: int, num_classes: int, steps: int = 5,
                   warmup: int = 2, autocast=nullcontext) -> dict:
    """{images_per_sec, peak_memory_mb, cuda} of `steps` timed training steps after `warmup` on a copy of `model`
    (its device), with random images and labels from a generator of its own (the run's random state is not
    touched). autocast: a context manager factory for the forward (the run's precision)."""
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    probe = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(probe.parameters(), lr=1e-6)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch_size, 3, img_size, img_size, generator=gen).to(device)
    y = torch.randint(0, num_classes, (batch_size,), generator=gen).to(device)

    def step():
        with autocast():
            loss = torch.nn.functional.cross_entropy(probe(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with torch.random.fork_rng(devices=[device] if cuda else []):  # drop path draws: not the run's
        return _timed(step, steps, warmup, batch_size, device, cuda)


def _timed(step, steps: int, warmup: int, batch_size: int, device, cuda: bool) -> dict:
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    before = _rss_mb()
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    memory = peak_memory_mb(device) if cuda else max(0.0, peak_memory_mb(device) - before)
    return {"images_per_sec": steps * batch_size / seconds, "peak_memory_mb": memory, "cuda": cuda}
