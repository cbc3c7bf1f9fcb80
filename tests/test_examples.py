"""Smoke runs of the worked examples in examples/ (tiny models, a few steps)."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from diffusers_mdit import MDiTPipeline
from diffusers_mdit.testing import ddim_x0, tiny_mdit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(ROOT, "examples", f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # trains and fine-tunes in every mode
def test_finetune_digits_runs_every_mode_and_writes_results(tmp_path):
    base = tmp_path / "base"
    model = tiny_mdit(in_channels=3, num_classes=10, sample_size=16)
    MDiTPipeline(transformer=model, scheduler=ddim_x0()).save_pretrained(base)
    results = load_example("finetune_digits").main(
        ["--base", str(base), "--output_dir", str(tmp_path / "out"), "--max_train_steps", "2",
         "--train_batch_size", "4", "--samples_per_class", "1", "--num_inference_steps", "2",
         "--core_kernel_size", "3"]
    )  # fmt: skip
    assert {f"fine-tuned@32 {mode}" for mode in ("full", "aggregate", "patch", "lora")} <= set(
        results
    )
    saved = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    assert saved.keys() == results.keys()
    assert all(0 <= r["accuracy"] <= 1 for r in saved.values())
    assert (tmp_path / "out" / "finetune-patch" / "samples.png").is_file()
    trainable = {mode: saved[f"fine-tuned@32 {mode}"]["trainable"] for mode in ("full", "patch")}
    assert trainable["full"] == sum(p.numel() for p in model.parameters())
    grown = MDiTPipeline.from_pretrained(tmp_path / "out" / "finetune-patch").transformer
    patch = (grown.core_patch_embed.proj.weight, grown.core_unpatch.proj.weight)
    assert trainable["patch"] == sum(p.numel() for p in patch)
