"""scripts/convert_diffit_to_diffusers.py on the tiny official checkpoint of the fixture, with a
tiny random VAE saved locally (sd-vae-ft-ema cannot be downloaded here)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file, save_file

from diffusers_mdit import DiffiTPipeline
from diffusers_mdit.testing import tiny_vae

ROOT = Path(__file__).parents[1]
FIXTURE = ROOT / "tests" / "models" / "fixtures" / "diffit_official_tiny.safetensors"


def script():
    spec = importlib.util.spec_from_file_location(
        "convert_diffit_to_diffusers", ROOT / "scripts" / "convert_diffit_to_diffusers.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def inputs(tmp_path: Path) -> tuple[Path, Path]:
    data = load_file(FIXTURE)
    state = {k[len("official.") :]: v for k, v in data.items() if k.startswith("official.")}
    checkpoint = tmp_path / "diffit_tiny.safetensors"
    save_file(state, checkpoint)
    vae_dir = tmp_path / "vae"
    tiny_vae().save_pretrained(vae_dir)
    return checkpoint, vae_dir


def test_writes_a_complete_pipeline_folder_with_the_official_settings(tmp_path):
    checkpoint, vae_dir = inputs(tmp_path)
    out = tmp_path / "converted"
    script().main(
        ["--checkpoint_path", str(checkpoint), "--vae_model_name_or_path", str(vae_dir),
         "--output_dir", str(out)]
    )  # fmt: skip

    pipe = DiffiTPipeline.from_pretrained(out)
    config = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "DDPMScheduler"
    assert (config.beta_start, config.beta_end, config.beta_schedule) == (1e-4, 0.02, "linear")
    assert (config.variance_type, config.prediction_type) == ("learned_range", "epsilon")
    assert (config.timestep_spacing, config.clip_sample) == ("linspace", False)
    assert pipe.vae.config.scaling_factor == 0.18215
    assert pipe.transformer.config.num_classes == 10
    generic = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    assert type(generic).__name__ == "DiffiTPipeline"

    card = (out / "README.md").read_text()
    assert "license: cc-by-nc-sa-4.0" in card
    assert "FID-50K 1.73" in card
    assert "guidance_scale=4.4" in card and "guidance_schedule='power-cosine'" in card
    assert "guidance_channels=3" in card and "num_inference_steps=250" in card

    images = pipe(
        class_labels=[1], num_inference_steps=2, guidance_scale=4.4,
        guidance_schedule="power-cosine", guidance_channels=3, output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


def test_refuses_an_image_size_the_checkpoint_does_not_have(tmp_path):
    checkpoint, vae_dir = inputs(tmp_path)
    with pytest.raises(ValueError, match="needs 64x64 latents"):
        script().main(
            ["--checkpoint_path", str(checkpoint), "--vae_model_name_or_path", str(vae_dir),
             "--image_size", "512", "--output_dir", str(tmp_path / "out")]
        )  # fmt: skip
