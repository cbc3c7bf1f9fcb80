"""Fault injection: bad inputs, files and arguments get our messages, not library tracebacks
or silent garbage (issue 22)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_mdit.lora import get_lora_metadata, get_lora_state_dict, lora_config
from diffusers_mdit.models import (
    DiffiTTransformer2DModel,
    DiffiTUNet2DModel,
    MDiTTransformer2DModel,
)
from diffusers_mdit.pipelines.pipeline_mdit import MDiTPipeline
from diffusers_mdit.pipelines.pipeline_mdit_text2img import MDiTTextToImagePipeline
from diffusers_mdit.testing import (
    TINY_DIFFIT_UNET,
    TINY_MDIT,
    ddim_x0,
    tiny_mdit,
    tiny_text_encoder,
)
from diffusers_mdit.training.data import ImageDataset
from diffusers_mdit.training.shards import INDEX_DTYPE, LatentShardDataset

TINY_DIFFIT = dict(sample_size=8, hidden_size=32, num_layers=1, num_attention_heads=2)

# ============================================================================================
# Points 5 and 7: images, data folders, shards, model inputs and configs, pipeline arguments,
# LoRA files, console scripts.
# ============================================================================================

# -- images and data folders ------------------------------------------------------------------


def test_16_bit_png_keeps_its_range(tmp_path):
    # PIL's convert("RGB") clips 16-bit values at 255: every non-black pixel came out white.
    values = np.array([0, 16384, 32768, 65535], dtype=np.uint16)
    Image.fromarray(np.tile(values, (4, 1))).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    pixels = ImageDataset(train_data_dir=str(tmp_path), resolution=4)[0]["pixel_values"]
    expected = torch.tensor(values / 65535 * 2 - 1, dtype=torch.float32)
    assert pixels.shape == (3, 4, 4)
    torch.testing.assert_close(pixels, expected.expand(3, 4, 4), atol=1e-5, rtol=0)


def test_corrupt_image_is_named(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    dataset = ImageDataset(train_data_dir=str(tmp_path), resolution=4)
    with pytest.raises(ValueError, match="cannot be read.*broken.png.*corrupt"):
        dataset[0]


@pytest.mark.parametrize("content", ["nothing", "no images"])
def test_data_folder_without_images(tmp_path, content):
    if content == "no images":
        (tmp_path / "class_a").mkdir()
        (tmp_path / "class_a" / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="holds no images.*Put image files"):
        ImageDataset(train_data_dir=str(tmp_path))


# -- latent shards ----------------------------------------------------------------------------


def _garbage_shards(folder, fault: str) -> str:
    (folder / "shard-000000.tar").write_bytes(b"garbage" * 200)
    metadata = {"shards": ["shard-000000.tar"], "latent_shape": [4, 2, 2], "flips": False}
    (folder / "metadata.json").write_text("{oops" if fault == "metadata" else json.dumps(metadata))
    index = np.zeros(1, INDEX_DTYPE)
    index["end"] = 1024
    np.save(folder / "index.npy", np.zeros(3) if fault == "index" else index)
    return str(folder / "metadata.json") if fault == "not a shard" else str(folder)


@pytest.mark.parametrize(
    "fault, message",
    [
        ("not a shard", "is not a .tar shard"),
        ("metadata", "metadata.json' is not valid JSON"),
        ("index", "is not an index of latent shards"),
        ("shard", "truncated or corrupt"),
    ],
)
def test_garbage_train_shards(tmp_path, fault, message):
    path = _garbage_shards(tmp_path, fault)
    with pytest.raises(ValueError, match=message):
        LatentShardDataset(path)[0]


# -- model inputs -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def labelled_mdit():
    return tiny_mdit(num_classes=10, cross_attention_dim=16, use_aux_conditions=True)


def test_floating_inputs_are_cast_to_the_model_dtype_integers_refused(labelled_mdit):
    x = torch.randn(2, 4, 8, 8)
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        expected = labelled_mdit(x.half().float(), 10, class_labels=labels).sample
        out = labelled_mdit(x.half(), 10, class_labels=labels).sample
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="floating point tensor, got torch.int64.*float()"):
        labelled_mdit(x.long(), 10, class_labels=labels)
    diffit = DiffiTTransformer2DModel(**TINY_DIFFIT).eval()
    assert diffit(x.half(), 10).sample.dtype == torch.float32
    with pytest.raises(ValueError, match="floating point tensor"):
        diffit((x * 100).to(torch.uint8), 10)


@pytest.mark.parametrize("labels", [torch.tensor([1.0, 2.0]), [1, 2]])
def test_float_or_list_class_labels_refused(labelled_mdit, labels):
    with pytest.raises(ValueError, match="class_labels must be an integer tensor"):
        labelled_mdit(torch.randn(2, 4, 8, 8), 10, class_labels=labels)


@pytest.mark.parametrize(
    "inputs, message",
    [
        (dict(timestep=torch.tensor([1, 2, 3])), "timestep must be a scalar or hold one value"),
        (
            dict(encoder_hidden_states=torch.randn(3, 5, 16)),
            "encoder_hidden_states has shape .3, 5, 16. but hidden_states has a batch of 2",
        ),
        (
            dict(
                encoder_hidden_states=torch.randn(2, 5, 16), encoder_attention_mask=torch.ones(3, 5)
            ),
            r"encoder_attention_mask must be \(batch, tokens\) = \(2, 5\)",
        ),
        (dict(encoder_attention_mask=torch.ones(2, 5)), "without encoder_hidden_states"),
        (dict(image_scale=torch.ones(3)), r"image_scale must have shape \(2,\)"),
    ],
)
def test_mismatched_batch_sizes(labelled_mdit, inputs, message):
    inputs = {"timestep": 10, **inputs}
    with pytest.raises(ValueError, match=message):
        labelled_mdit(torch.randn(2, 4, 8, 8), **inputs)


# -- configs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls, base, name, value",
    [
        (MDiTTransformer2DModel, TINY_MDIT, "attention_head_dim", 0),
        (MDiTTransformer2DModel, TINY_MDIT, "core_patch_size", 0),
        (MDiTTransformer2DModel, TINY_MDIT, "core_dim", 0),
        (MDiTTransformer2DModel, TINY_MDIT, "in_channels", -2),
        (MDiTTransformer2DModel, TINY_MDIT, "ffn_mult", 0),
        (DiffiTTransformer2DModel, TINY_DIFFIT, "sample_size", 0),
        (DiffiTTransformer2DModel, TINY_DIFFIT, "patch_size", 0),
        (DiffiTTransformer2DModel, TINY_DIFFIT, "hidden_size", 0),
        (DiffiTTransformer2DModel, TINY_DIFFIT, "window_size", 0),
        (DiffiTUNet2DModel, TINY_DIFFIT_UNET, "attention_head_dim", 0),
        (DiffiTUNet2DModel, TINY_DIFFIT_UNET, "norm_num_groups", 0),
        (DiffiTUNet2DModel, TINY_DIFFIT_UNET, "window_size", -4),
    ],
)
def test_zero_or_negative_config_sizes(cls, base, name, value):
    with pytest.raises(ValueError, match=rf"{name}(\[0\])? must be a (positive integer|finite)"):
        cls(**{**base, name: value})


def test_empty_or_negative_unet_levels():
    with pytest.raises(ValueError, match="block_out_channels is empty"):
        DiffiTUNet2DModel(**{**TINY_DIFFIT_UNET, "block_out_channels": (), "layers_per_level": ()})
    with pytest.raises(ValueError, match="layers_per_level entries must be >= 0"):
        DiffiTUNet2DModel(**{**TINY_DIFFIT_UNET, "layers_per_level": (1, -1)})


@pytest.mark.parametrize("name", ["outer_kernel_size", "core_kernel_size"])
@pytest.mark.parametrize("kernel", [4, 0, -3])
def test_even_zero_or_negative_kernels_refused_at_build(name, kernel):
    with pytest.raises(ValueError, match=f"{name} must be an odd positive kernel size"):
        MDiTTransformer2DModel(**{**TINY_MDIT, name: kernel})


def test_even_kernel_refused_when_switching_core_attention():
    with pytest.raises(ValueError, match="kernel_size must be an odd positive kernel size"):
        tiny_mdit().set_core_attention("neighborhood", 4)


# -- pipeline arguments -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pixel_pipeline():
    pipe = MDiTPipeline(tiny_mdit(num_classes=10, in_channels=3), ddim_x0())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(num_inference_steps=2.5), "num_inference_steps must be an integer, got 2.5"),
        (dict(height=-8), "height must be a positive integer of pixels, got -8"),
        (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number, got nan"),
        (dict(batch_size=3), "Give class_labels or batch_size, not both"),
        (dict(class_labels=[1.5]), "class_labels must be integer class ids"),
        (dict(class_labels=[]), "class_labels is empty"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt must be a positive integer"),
        (dict(core_patch_schedule=1.5), r"core_patch_schedule .* must lie in \[0, 1\]"),
        (dict(core_patch_schedule=-0.5), r"core_patch_schedule .* must lie in \[0, 1\]"),
    ],
)
def test_pipeline_arguments(pixel_pipeline, arguments, message):
    arguments = {"class_labels": [1], "num_inference_steps": 1, "output_type": "np", **arguments}
    with pytest.raises(ValueError, match=message):
        pixel_pipeline(**arguments)


@pytest.mark.parametrize("prompt", [[], None, [1]])
def test_text_pipeline_prompts(prompt):
    encoder, tokenizer = tiny_text_encoder()
    model = tiny_mdit(cross_attention_dim=32, in_channels=3)
    pipe = MDiTTextToImagePipeline(model, ddim_x0(), encoder, tokenizer)
    with pytest.raises(ValueError, match="prompt must (be a string or a non-empty list|hold only)"):
        pipe(prompt=prompt, num_inference_steps=1, output_type="np")


# -- LoRA files -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_folder(tmp_path_factory):
    pipe = MDiTPipeline(tiny_mdit(), ddim_x0())
    pipe.transformer.add_adapter(lora_config(rank=4))
    folder = tmp_path_factory.mktemp("lora")
    pipe.save_lora_weights(
        folder,
        transformer_lora_layers=get_lora_state_dict(pipe.transformer),
        transformer_lora_adapter_metadata=get_lora_metadata(pipe.transformer),
    )
    return folder


def test_lora_of_other_widths(lora_folder):
    pipe = MDiTPipeline(tiny_mdit(outer_dim=48, core_dim=96), ddim_x0())
    with pytest.raises(ValueError, match="LoRA weight .* has shape .* other widths"):
        pipe.load_lora_weights(lora_folder)


def test_truncated_lora_file(lora_folder, tmp_path):
    data = (lora_folder / "pytorch_lora_weights.safetensors").read_bytes()
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(data[: len(data) // 2])
    pipe = MDiTPipeline(tiny_mdit(), ddim_x0())
    with pytest.raises(ValueError, match="cannot be read .* truncated or corrupt"):
        pipe.load_lora_weights(tmp_path)


# -- console scripts --------------------------------------------------------------------------


def test_console_scripts_print_user_errors_without_traceback(tmp_path, capsys):
    from diffusers_mdit.cli import sizes
    from diffusers_mdit.evaluation.cli import main as evaluate
    from diffusers_mdit.explain.cli import main as explain

    assert sizes(["--preset", "MDiT-S", "--resolution", "18", "--no_table"]) == 2
    assert capsys.readouterr().err.startswith("mdit-sizes: error: Height and width must be")
    assert explain(["spectrum", str(tmp_path / "missing"), "--output_dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("mdit-explain: error: ")
    # A folder that is no model: the message must not name train_mdit.py's flag.
    argv = ["generate", str(tmp_path), "--output_dir", str(tmp_path / "out"), "--num_samples", "1"]
    assert evaluate(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("mdit-eval generate: error: ") and "neither model_index.json" in error
    assert "--pretrained_model_name_or_path" not in error


# ============================================================================================
