"""Smoke runs of the benchmark scripts (``--quick``): they run and print their ratio lines.
The numbers themselves are measured by running the scripts (benchmarks/RESULTS.md)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXPECTED = {
    "bench_model.py": ["MDiT-B / DiT-B/2", "DiT-B analog / DiT-B/2", "DiffiT-B / DiT-B/2",
                       "target: MDiT-B training GFLOP/s", "faults/step"],
    "bench_scaling.py": ["exponent", "target: MDiT-S NA core"],
    "bench_sampling.py": ["MDiTPipeline (MDiT-S) / DiTPipeline (DiT-S/2)", "target <= 1.3x",
                          "achieved GFLOP/s ratio", "neighborhood attention [torch]"],
    "bench_attention.py": ["glob/ours"],
    "bench_data.py": ["samples/s consumed", "loader processes in all"],
    "bench_diffit_official.py": ["s per 250-step sample", "peak RSS"],
    "bench_heap.py": ["minor faults", "after backward"],
}  # fmt: skip


@pytest.mark.slow  # each script builds and times models: minutes on 2 cores
@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_quick_run_prints_its_ratios(script):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", script), "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for line in EXPECTED[script]:
        assert line in result.stdout, (line, result.stdout[-2000:])


@pytest.mark.slow
def test_compile_benchmark_quick_run_prints_its_ratio():
    """Separate and slow: compiling even a tiny model takes a minute or more on 2 cores."""
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_compile.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "eager / compiled step time" in result.stdout, result.stdout[-2000:]


@pytest.mark.slow
def test_gpu_benchmark_runs_on_cpu_quick():
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_gpu.py"), "--device", "cpu",
         "--quick"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    for line in ("MDiT-S / DiT-S/2 (eager)", "neighborhood attention", "sampling latency"):
        assert line in result.stdout, (line, result.stdout[-2000:])


@pytest.mark.slow
def test_heap_benchmark_trace_names_the_lines():
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_heap.py"), "--quick", "--trace"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "heap shrinks during steps 1+" in result.stdout, result.stdout[-2000:]
