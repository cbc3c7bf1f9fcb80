"""Where a CPU training step's page faults come from: glibc's heap, step by step.

Runs training steps of one model in this process (as ``bench_model.py``'s worker does: the
gradients set to None, forward, ``square().mean().backward()``) and prints, per step, its time,
the process's minor page faults (pages taken afresh from the OS, zeroed and mapped by the kernel
on first touch) and where the top of glibc's main heap (``sbrk(0)``) stood after the forward and
after the backward, against the step's start: a top that ends lower was trimmed (freed memory at
the top handed back to the OS, to be faulted in again by the next step; a top that ends higher
grew, as freed memory did not fit the step's buffers).

``--trace`` also attributes every heap shrink to the first Python event after it (the line
about to run: it says where in the step, not which free). It uses ``sys.setprofile`` and one
``sbrk(0)`` per Python event, so traced steps are slower and their times not comparable with
untraced ones. ``--per_parameter`` sets the gradients to None one at a time instead of
``zero_grad`` and names those whose freeing trimmed the heap.

    python benchmarks/bench_heap.py                        # MDiT-B, batch 8, 6 steps (~1.5 min)
    python benchmarks/bench_heap.py --model DiT-B/2 --trace
    python benchmarks/bench_heap.py --keep_grads           # zero_grad(set_to_none=False)
    python benchmarks/bench_heap.py --per_parameter        # which gradient's freeing trims
    python benchmarks/bench_heap.py --quick                # CI smoke run

Linux with glibc only (``sbrk`` from ``libc.so.6``). Sets no allocator option.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import os
import resource
import sys
import time

import torch
from bench_model import all_builders, call, inputs

from diffusers_mdit.profiling import cpu_name


def _sbrk():
    libc = ctypes.CDLL("libc.so.6")
    libc.sbrk.restype = ctypes.c_void_p
    libc.sbrk.argtypes = [ctypes.c_long]
    return lambda: libc.sbrk(0)


class HeapTracer:
    """Attributes heap shrinks to the first Python event after ``sbrk(0)`` went down."""

    def __init__(self, heap_top):
        self.heap_top, self.last = heap_top, heap_top()
        self.shrinks, self.shrunk = collections.Counter(), collections.Counter()

    def __call__(self, frame, event, arg):
        top = self.heap_top()
        if top < self.last:
            code = frame.f_code
            where = f"{os.path.basename(code.co_filename)}:{frame.f_lineno} {code.co_name}"
            self.shrinks[where] += 1
            self.shrunk[where] += self.last - top
        self.last = top


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="MDiT-B", choices=sorted(all_builders(4)))
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--keep_grads", action="store_true", help="zero_grad(set_to_none=False)")
    parser.add_argument("--trace", action="store_true", help="attribute heap shrinks to lines")
    parser.add_argument(
        "--per_parameter",
        action="store_true",
        help="free the gradients one at a time; name those whose freeing trimmed the heap",
    )
    parser.add_argument("--quick", action="store_true", help="MDiT-S at 16x16, batch 1, 3 steps")
    args = parser.parse_args()
    if args.quick:
        args.model, args.resolution, args.batch_size, args.steps = "MDiT-S", 16, 1, 3
    builders = all_builders(4)
    if args.quick:
        from diffusers_mdit import MDiTTransformer2DModel

        builders["MDiT-S"] = lambda: MDiTTransformer2DModel.from_preset("MDiT-S", num_classes=1000)

    heap_top = _sbrk()
    torch.manual_seed(0)
    model = builders[args.model]()
    torch.manual_seed(1)
    batch = inputs(args.batch_size, args.resolution, "cpu")
    print(
        f"config: {args.model}, batch {args.batch_size}, latent 4x{args.resolution}x"
        f"{args.resolution}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"zero_grad(set_to_none={not args.keep_grads}), malloc variables: "
        f"{' '.join(k for k in os.environ if k.startswith('MALLOC_')) or 'none'}"
    )
    print(f"machine: {cpu_name()}")
    tracer = HeapTracer(heap_top) if args.trace else None
    for step in range(args.steps):
        if tracer is not None and step > 0:
            tracer.last = heap_top()
            sys.setprofile(tracer)  # from zero_grad on: freeing the gradients can trim the heap
        if args.per_parameter:
            for name, parameter in model.named_parameters():
                before = heap_top()
                parameter.grad = None
                if (after := heap_top()) < before:
                    print(
                        f"  before step {step}: freeing the gradient of {name} "
                        f"{tuple(parameter.shape)} trimmed {(before - after) / 2**20:.1f} MiB"
                    )
        else:
            model.zero_grad(set_to_none=not args.keep_grads)
        start_top = heap_top()
        minflt = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        output = call(model, *batch)
        forward_top = heap_top()
        output.float().square().mean().backward()
        del output
        seconds = time.perf_counter() - start
        sys.setprofile(None)
        step_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - minflt
        end_top = heap_top()
        print(
            f"step {step}: {seconds:6.2f} s  minor faults {step_faults:8d}  heap top "
            f"{(forward_top - start_top) / 2**20:+8.1f} MiB after forward, "
            f"{(end_top - start_top) / 2**20:+8.1f} MiB after backward"
            + (" (first step: heap grows)" if step == 0 else "")
        )
    if tracer is not None:
        print("heap shrinks during steps 1+ (MiB handed back to the OS, times, Python line):")
        for where, amount in tracer.shrunk.most_common(10):
            print(f"  {amount / 2**20:8.1f} MiB  x{tracer.shrinks[where]:<3d} {where}")


if __name__ == "__main__":
    main()
