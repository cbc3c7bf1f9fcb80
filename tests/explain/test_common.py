"""The explain package's shared pieces: loading folders, naming blocks, hooks, JSON output."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from diffusers_mdit import MDiTPipeline
from diffusers_mdit.explain import load_for_analysis, to_jsonable, write_json
from diffusers_mdit.explain.cli import build_parser
from diffusers_mdit.explain.common import block_names, capture_outputs, normalised_depth
from diffusers_mdit.testing import ddim_x0, tiny_mdit


def test_loads_a_pipeline_folder_and_a_model_folder(tmp_path):
    model = tiny_mdit(num_classes=10)
    MDiTPipeline(transformer=model, scheduler=ddim_x0()).save_pretrained(tmp_path / "pipe")
    model.save_pretrained(tmp_path / "model")
    sample = torch.randn(1, 4, 8, 8)
    expected = model(sample, 10, class_labels=torch.tensor([3])).sample
    for folder, has_pipeline in (("pipe", True), ("model", False)):
        loaded = load_for_analysis(str(tmp_path / folder))
        assert (loaded.pipeline is not None) == has_pipeline
        assert not loaded.model.training
        assert not any(p.requires_grad for p in loaded.model.parameters())
        torch.testing.assert_close(
            loaded.model(sample, 10, class_labels=torch.tensor([3])).sample, expected
        )
    with pytest.raises(ValueError, match="needs a pipeline folder"):
        load_for_analysis(str(tmp_path / "model")).require_pipeline("core-contribution")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_for_analysis(str(tmp_path / "missing"))


def test_block_names_follow_execution_order_and_levels():
    model = tiny_mdit()  # {1, 1, 2, 1}: outer, K/2 = 1 x (core, aggregate), L = 1 core, outer
    names = [name for name, _ in block_names(model)]
    assert names == ["outer_in.0", "core.0", "aggregate.0", "core.1", "outer_out.0"]
    assert normalised_depth(4) == [0.125, 0.375, 0.625, 0.875]


def test_capture_outputs_records_each_block_once_per_forward_and_removes_its_hooks():
    model = tiny_mdit().eval()
    blocks = dict(block_names(model))
    sample = torch.randn(2, 4, 8, 8)
    with capture_outputs(blocks) as outputs, torch.no_grad():
        out = model(sample, 5).sample
        model(sample, 5)
    assert all(len(v) == 2 for v in outputs.values())
    assert outputs["outer_in.0"][0].shape == (2, 8, 8, 32)  # channels-last, outer width
    assert outputs["core.0"][0].shape == (2, 4, 4, 64)  # core patch 2, core width
    assert all(not block._forward_hooks for block in blocks.values())
    with torch.no_grad():
        torch.testing.assert_close(model(sample, 5).sample, out)


@dataclass
class _Result:
    values: torch.Tensor
    nested: dict


def test_to_jsonable_and_write_json(tmp_path):
    result = _Result(torch.tensor([1.5, 2.0]), {"a": np.float32(3.0), 4: [float("nan"), 1]})
    assert to_jsonable(result) == {"values": [1.5, 2.0], "nested": {"a": 3.0, "4": [None, 1]}}
    path = write_json(result, str(tmp_path / "sub" / "out.json"))
    assert json.loads(open(path).read())["nested"]["4"][0] is None
    assert not math.isnan(json.loads(open(path).read())["values"][0])


def test_cli_lists_only_analyses_that_exist():
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["no-such-analysis", "x", "--output_dir", "y"])


def test_sampling_labels_cycle_classes_or_count_unconditional_images():
    from diffusers_mdit.explain.common import sampling_labels

    conditional = MDiTPipeline(transformer=tiny_mdit(num_classes=3), scheduler=ddim_x0())
    assert sampling_labels(conditional, 4, start=2) == {"class_labels": [2, 0, 1, 2]}
    unconditional = MDiTPipeline(transformer=tiny_mdit(), scheduler=ddim_x0())
    assert sampling_labels(unconditional, 4) == {"batch_size": 4}

    class TextPipeline:
        def __call__(self, prompt, num_inference_steps=50):
            pass

    with pytest.raises(ValueError, match="Spectrum .* takes no class_labels"):
        sampling_labels(TextPipeline(), 2, analysis="Spectrum")
