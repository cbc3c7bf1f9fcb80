"""Our models vs diffusers' DiT on this machine, measured side by side in one run.

Two comparisons (``--pair``):

- ``mdit``: MDiT-B, our DiT analog {0, 0, 0, 12} ("DiT-B" preset: MDiT blocks without outer
  level or aggregate blocks) and DiffiT at the same width (768, 12 layers, 12 heads, "DiffiT-B")
  vs diffusers' ``DiTTransformer2DModel`` DiT-B/2 (12 layers, width 768).
- ``diffit``: DiffiT-XL vs DiT-XL/2 (width 1152, 16 heads, learned sigma), both at reduced depth
  (``--diffit_depth``, default 4 of 28) so a CPU run takes minutes: blocks are identical, so the
  per-block rate is what a full-depth model achieves.

Prints, for each batch size, forward and forward+backward seconds per image, model GFLOPs,
achieved GFLOP/s, the fraction of this machine's best measured fp32 matmul rate, the peak
memory of one training step, and the ratios. FLOPs are counted by
``torch.utils.flop_counter`` on the meta device (matmuls and attention; neighborhood attention
at its ideal k*k cost), forward+backward as counted through autograd. Every repeat runs every
model once (interleaved) and the median is reported.

    python benchmarks/bench_model.py                 # both pairs, batch 8 (CPU: ~6 min)
    python benchmarks/bench_model.py --pair mdit
    python benchmarks/bench_model.py --pair mdit --models MDiT-B --batch_size 2 8 --no_memory
    python benchmarks/bench_model.py --quick         # CI smoke run
    python benchmarks/bench_model.py --device cuda --batch_size 64 --autocast bf16

Target (issue 19): MDiT-B's training GFLOP/s >= 0.95x DiT-B/2's at every batch size, with
glibc's default allocator: the script sets no allocator option. On glibc, buffers over the
malloc mmap threshold (at most 32 MiB by default) are returned to the OS when freed and
page-faulted in again on every allocation, which costs MDiT's full-resolution outer level more
than DiT; the models keep their large temporaries under it (chunked feed-forward and
neighborhood attention). The config line reports ``MALLOC_MMAP_THRESHOLD_`` if the caller set
it.

faults/step: the process's minor page faults during one timed training step (median): memory
the allocator took from the OS afresh (glibc trims its heap when a step frees enough at the
top, and maps large buffers directly), each page zeroed and mapped by the kernel on first touch.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over one training step; on CPU each
model runs one training step in a fresh process (Linux), and the figure is the process's peak
resident set during the step (``VmHWM``, reset just before it) minus what the built model and
its inputs already held: activations, gradients and temporaries, not the weights.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from diffusers import DiTTransformer2DModel
from torch.utils.flop_counter import FlopCounterMode

from diffusers_mdit import DiffiTTransformer2DModel, MDiTTransformer2DModel
from diffusers_mdit.profiling import cpu_name


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: other jobs on the machine slow every model."""
    return " / ".join(f"{load:.2f}" for load in os.getloadavg())


def diffusers_dit(width: int, heads: int, depth: int) -> DiTTransformer2DModel:
    """DiT-*/2 exactly as in the DiT paper (learned sigma: 8 output channels)."""
    return DiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=width // heads,
        in_channels=4,
        out_channels=8,
        num_layers=depth,
        sample_size=32,
        patch_size=2,
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_zero",
    )


def builders(diffit_depth: int) -> dict[str, dict[str, Callable[[], torch.nn.Module]]]:
    return {
        # The last model of a group is the baseline the others are compared with.
        "mdit": {
            "MDiT-B": lambda: MDiTTransformer2DModel.from_preset("MDiT-B"),
            "DiT-B analog": lambda: MDiTTransformer2DModel.from_preset("DiT-B"),
            "DiffiT-B": lambda: DiffiTTransformer2DModel.from_preset(
                "DiffiT-XL", hidden_size=768, num_attention_heads=12, num_layers=12, out_channels=8
            ),
            "DiT-B/2": lambda: diffusers_dit(768, 12, 12),
        },
        "diffit": {
            f"DiffiT-XL[{diffit_depth}]": lambda: DiffiTTransformer2DModel.from_preset(
                "DiffiT-XL", num_layers=diffit_depth, out_channels=8
            ),
            f"DiT-XL/2[{diffit_depth}]": lambda: diffusers_dit(1152, 16, diffit_depth),
        },
    }


def call(model, latents, timestep, labels):
    if isinstance(model, DiTTransformer2DModel):
        return model(latents, timestep=timestep, class_labels=labels).sample
    return model(latents, timestep, class_labels=labels).sample


def inputs(batch, resolution, device):
    latents = torch.randn(batch, 4, resolution, resolution, device=device)
    timestep = torch.randint(0, 1000, (batch,), device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    return latents, timestep, labels


def count_flops(build, resolution: int) -> tuple[int, int]:
    """(forward, forward+backward) FLOPs per image, counted on the meta device."""
    with torch.device("meta"):
        model = build()
        args = inputs(1, resolution, "meta")
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            call(model, *args)
        forward = counter.get_total_flops()
        counter = FlopCounterMode(display=False)
        with counter:
            call(model, *args).sum().backward()
        train = counter.get_total_flops()
    return forward, train


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, size=2048, repeats=5) -> float:
    """Best fp32 matmul rate; sampled between the model repeats, the best sample is kept."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times) / 1e9


def training_step(model, batch, dtype, device):
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        call(model, *batch).float().square().mean().backward()


ISOLATION = {
    "process": "isolation: each model in a process of its own (as a training run is), the "
    "processes timed in turn",
    "none": "isolation: none, all models in this process (their allocations share one heap)",
}


def timed_step(model, batch, train: bool, dtype, device) -> tuple[float, int]:
    """Seconds of one forward (no grad) or training step, and the minor page faults during it."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    sync(device)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    if train:
        training_step(model, batch, dtype, device)
    else:
        with torch.no_grad(), torch.autocast(device.type, dtype, enabled=dtype is not None):
            call(model, *batch)
    sync(device)
    seconds = time.perf_counter() - start
    return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def build_for_timing(name: str, args) -> tuple[torch.nn.Module, tuple]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = all_builders(args.diffit_depth)[name]().to(device)
    torch.manual_seed(1)
    return model, inputs(args.batch_size, args.resolution, device)


class LocalTimer:
    """Times a model built in this process (``--isolation none``)."""

    def __init__(self, name: str, args):
        self.model, self.batch = build_for_timing(name, args)
        self.parameters = sum(p.numel() for p in self.model.parameters())
        self.dtype, self.device = AUTOCAST[args.autocast], torch.device(args.device)

    def step(self, train: bool) -> tuple[float, int]:
        return timed_step(self.model, self.batch, train, self.dtype, self.device)

    def close(self) -> None:
        self.model = self.batch = None


def _timer_process(connection, name: str, settings: dict) -> None:
    """Body of a :class:`ProcessTimer` worker: build the model, then time steps on request."""
    torch.set_num_threads(settings["threads"])
    timer = LocalTimer(name, argparse.Namespace(**settings))
    connection.send(timer.parameters)
    while (train := connection.recv()) is not None:
        connection.send(timer.step(train))


class ProcessTimer:
    """Times a model that lives in a worker process of its own (``--isolation process``).

    Models timed in one process share glibc's heap, and each one's allocations shape the
    other's: measured here (MDiT-B and DiT-B/2, training at batch 2), DiT-B/2 alone faulted in
    ~100k fresh pages per step and MDiT-B alone ~60k, but side by side in one process DiT-B/2
    ran on the heap MDiT-B had grown (0 faults) while MDiT-B kept ~30k. A training run has one
    model per process, so each model gets its own; the parent still interleaves their repeats.
    """

    def __init__(self, name: str, args):
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        self.process = context.Process(
            target=_timer_process, args=(child, name, vars(args)), daemon=True
        )
        self.process.start()
        self.parameters = self.connection.recv()

    def step(self, train: bool) -> tuple[float, int]:
        self.connection.send(train)
        return self.connection.recv()

    def close(self) -> None:
        self.connection.send(None)
        self.process.join()


def make_timer(name: str, args):
    return ProcessTimer(name, args) if args.isolation == "process" else LocalTimer(name, args)


def step_memory(name: str, args) -> float:
    """Peak memory (MiB) of one training step of model ``name`` (see the module docstring)."""
    device = torch.device(args.device)
    if device.type == "cuda":
        model = all_builders(args.diffit_depth)[name]().to(device)
        batch = inputs(args.batch_size, args.resolution, device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        training_step(model, batch, AUTOCAST[args.autocast], device)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    command = [
        sys.executable, os.path.abspath(__file__), "--measure_memory", name,
        "--batch_size", str(args.batch_size), "--resolution", str(args.resolution),
        "--diffit_depth", str(args.diffit_depth), "--threads", str(args.threads),
        "--autocast", args.autocast,
    ]  # fmt: skip
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return float(output.strip().splitlines()[-1])


def measure_memory_here(args) -> None:
    """Child process of :func:`step_memory` on CPU: print the peak RSS growth in MiB."""
    torch.manual_seed(0)
    model = all_builders(args.diffit_depth)[args.measure_memory]()
    batch = inputs(args.batch_size, args.resolution, torch.device("cpu"))
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
    training_step(model, batch, AUTOCAST[args.autocast], torch.device("cpu"))
    print((_status_kib("VmHWM") - before) / 1024)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}.")


def all_builders(diffit_depth: int) -> dict[str, Callable[[], torch.nn.Module]]:
    return {name: b for group in builders(diffit_depth).values() for name, b in group.items()}


AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
TARGET = 0.95  # issue 19: MDiT-B's achieved GFLOP/s over DiT-B/2's


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pair", choices=["mdit", "diffit", "all"], default="all")
    parser.add_argument("--batch_size", type=int, nargs="+", default=[8], help="one or more")
    parser.add_argument(
        "--models", nargs="+", default=None, help="only these of each pair (and its baseline)"
    )
    parser.add_argument("--resolution", type=int, default=32, help="latent height and width")
    parser.add_argument("--diffit_depth", type=int, default=4, help="DiffiT-XL / DiT-XL depth")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--autocast", choices=["none", "bf16", "fp16"], default="none")
    parser.add_argument(
        "--quick", action="store_true", help="batch 2, 16x16 latents, 1 repeat: a smoke run"
    )
    parser.add_argument("--no_memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument(
        "--isolation", choices=list(ISOLATION), default="process",
        help="'process': each model timed in a process of its own (default); 'none': all in this "
        "one, where their allocations shape each other's",
    )  # fmt: skip
    parser.add_argument("--measure_memory", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.batch_size, args.repeats, args.diffit_depth, args.resolution = [2], 1, 1, 16
    torch.set_num_threads(args.threads)
    if args.measure_memory:
        args.batch_size = args.batch_size[0]
        measure_memory_here(args)
        return
    batch_sizes = args.batch_size
    for index, batch_size in enumerate(batch_sizes):
        if index:
            print()
        args.batch_size = batch_size
        run(args)


def run(args) -> None:
    """Every model of the chosen pairs at one batch size (``args.batch_size``)."""
    device = torch.device(args.device)
    malloc = os.environ.get("MALLOC_MMAP_THRESHOLD_", "glibc default")
    print(
        f"config: batch {args.batch_size}, latent 4x{args.resolution}x{args.resolution}, "
        f"{args.repeats} interleaved repeats (median), device {device}, "
        f"{torch.get_num_threads()} threads, autocast {args.autocast}, torch {torch.__version__}, "
        f"malloc mmap threshold: {malloc}"
    )
    print(f"machine: {cpu_name()}, load average {load_average()} (1/5/15 min, at start)")
    print(ISOLATION[args.isolation])

    pairs = builders(args.diffit_depth)
    pairs = pairs if args.pair == "all" else {args.pair: pairs[args.pair]}
    if args.models:
        pairs = {
            key: {n: b for i, (n, b) in enumerate(p.items()) if n in args.models or i == len(p) - 1}
            for key, p in pairs.items()
        }
    names = [name for pair in pairs.values() for name in pair]
    builds = {name: build for pair in pairs.values() for name, build in pair.items()}
    flops = {name: count_flops(builds[name], args.resolution) for name in names}
    timers = {name: make_timer(name, args) for name in names}
    parameters = {name: timer.parameters for name, timer in timers.items()}
    times = {name: {"fwd": [], "train": [], "faults": []} for name in names}

    for timer in timers.values():  # warm-up
        timer.step(False)
        timer.step(True)
    peaks = [matmul_peak(device)]
    for _ in range(args.repeats):
        peaks.append(matmul_peak(device))
        for name, timer in timers.items():
            times[name]["fwd"].append(timer.step(False)[0])
            seconds, faults = timer.step(True)
            times[name]["train"].append(seconds)
            times[name]["faults"].append(faults)
    for timer in timers.values():
        timer.close()

    memory = {}
    if not args.no_memory:
        for name in names:
            memory[name] = step_memory(name, args)
    peak = max(peaks)
    print(f"matmul peak (2048^3 fp32, best of {5 * len(peaks)}): {peak:.1f} GFLOP/s")
    rows = {}
    print(
        f"\n{'model':<14} {'params':>8} {'GFLOPs fwd':>11} {'fwd s/img':>10} {'fwd GFLOP/s':>12} "
        f"{'fwd+bwd s/img':>14} {'train GFLOP/s':>14} {'% peak':>7} {'step MiB':>9} "
        f"{'faults/step':>11}"
    )
    for name in names:
        fwd = statistics.median(times[name]["fwd"]) / args.batch_size
        train = statistics.median(times[name]["train"]) / args.batch_size
        forward_flops, train_flops = flops[name]
        rows[name] = dict(
            fwd=fwd,
            train=train,
            fwd_rate=forward_flops / fwd / 1e9,
            train_rate=train_flops / train / 1e9,
        )
        params = parameters[name]
        print(
            f"{name:<14} {params / 1e6:>7.1f}M {forward_flops / 1e9:>11.2f} {fwd:>10.3f} "
            f"{rows[name]['fwd_rate']:>12.1f} {train:>14.3f} {rows[name]['train_rate']:>14.1f} "
            f"{100 * rows[name]['train_rate'] / peak:>6.0f}% "
            f"{memory.get(name, float('nan')):>9.0f} "
            f"{statistics.median(times[name]['faults']):>11.0f}"
        )
    print()
    for pair in pairs.values():
        *ours, baseline = list(pair)
        for name in ours:
            a, b = rows[name], rows[baseline]
            print(
                f"{name} / {baseline}: forward time {a['fwd'] / b['fwd']:.2f}x, "
                f"fwd+bwd time {a['train'] / b['train']:.2f}x, "
                f"FLOPs {flops[name][0] / flops[baseline][0]:.2f}x; achieved GFLOP/s ratio: "
                f"forward {a['fwd_rate'] / b['fwd_rate']:.2f}, "
                f"fwd+bwd {a['train_rate'] / b['train_rate']:.2f}"
            )
    if "MDiT-B" in rows:
        ratio = rows["MDiT-B"]["train_rate"] / rows["DiT-B/2"]["train_rate"]
        verdict = "met" if ratio >= TARGET else f"missed by {TARGET - ratio:.2f}"
        print(
            f"target: MDiT-B training GFLOP/s >= {TARGET}x DiT-B/2's at batch {args.batch_size}: "
            f"{ratio:.2f}x ({verdict})"
        )


if __name__ == "__main__":
    main()
