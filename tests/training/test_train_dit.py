"""The original DiT trains with training/train_mdit.py like the other families: every objective,
a saved pipeline that samples, and the preset path through ``build_model``."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from diffusers_mdit import DiTBaselinePipeline, DiTBaselineTransformer2DModel
from diffusers_mdit.families import load_model
from diffusers_mdit.testing import TINY_DIT
from diffusers_mdit.training.trainer import add_arguments, build_model, train

CONFIG = {"_class_name": "DiTBaselineTransformer2DModel", **TINY_DIT, "attention_head_dim": 16}


def parse(tmp_path, output, **extra):
    config = tmp_path / "dit.json"
    config.write_text(json.dumps(CONFIG))
    values = dict(
        output_dir=str(output),
        model_config=str(config),
        resolution=8,
        train_batch_size=8,
        max_train_steps=2,
        learning_rate=2e-3,
        report_to="none",
        num_validation_steps=2,
        seed=0,
    )
    values.update(extra)
    argv = []
    for key, value in values.items():
        argv += [f"--{key}"] if value is None else [f"--{key}", str(value)]
    return add_arguments(argparse.ArgumentParser()).parse_args(argv)


@pytest.mark.parametrize(
    "objective, scheduler",
    [
        (dict(prediction_type="x0"), "DDIMScheduler"),
        (dict(prediction_type="epsilon"), "DDPMScheduler"),
        (dict(prediction_type="epsilon", learned_variance=None), "DDPMScheduler"),
        (dict(prediction_type="flow"), "FlowMatchEulerDiscreteScheduler"),
    ],
    ids=["x0", "epsilon", "epsilon-learned-variance", "flow"],
)
def test_dit_trains_on_every_objective_and_saves_a_pipeline_that_samples(
    tmp_path, objective, scheduler
):
    result = train(parse(tmp_path, tmp_path / "run", **objective))
    assert result.steps == 2 and torch.isfinite(torch.tensor(result.final_loss))

    pipe = DiTBaselinePipeline.from_pretrained(result.pipeline_dir)
    model = pipe.transformer
    assert type(model) is DiTBaselineTransformer2DModel
    assert type(pipe.scheduler).__name__ == scheduler
    learned = "learned_variance" in objective
    assert model.config.out_channels == (6 if learned else 3)
    assert model.config.num_classes == 10  # the digits
    # Two steps moved the zero-initialised output layer: the model no longer predicts 0.
    assert model.proj_out_2.weight.abs().max() > 0
    images = pipe(class_labels=[3, 10], num_inference_steps=2, output_type="pt").images
    assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()
    assert type(load_model(result.pipeline_dir)) is DiTBaselineTransformer2DModel


def test_dit_trains_unconditionally(tmp_path):
    result = train(parse(tmp_path, tmp_path / "run", unconditional=None))
    pipe = DiTBaselinePipeline.from_pretrained(result.pipeline_dir)
    assert pipe.transformer.config.num_classes == 0
    images = pipe(batch_size=2, num_inference_steps=2, output_type="pt").images
    assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()


def test_the_dit_presets_build_for_the_training_data(tmp_path):
    args = parse(tmp_path, tmp_path / "run", model_config="", preset="DiT-S/2")
    args.learned_variance = True
    model = build_model(args, num_classes=10, channels=3)
    config = model.config
    assert type(model) is DiTBaselineTransformer2DModel
    assert (config.in_channels, config.out_channels, config.num_classes) == (3, 6, 10)
    assert (config.sample_size, config.num_layers, model.inner_dim) == (8, 12, 384)
    args.resolution = 9
    with pytest.raises(ValueError, match="multiple of patch_size=2"):
        build_model(args, num_classes=10, channels=3)
