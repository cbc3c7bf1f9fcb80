"""Latent shards: preparation round trips (latents, flips, labels, aux values, text states,
metadata), random access, training from shards into loadable pipelines, and the errors."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os

import numpy as np
import PIL.Image
import pytest
import torch
import webdataset
from safetensors.torch import load_file

from diffusers_mdit import MDiTPipeline, MDiTTextToImagePipeline
from diffusers_mdit.data import ImageDataset
from diffusers_mdit.data.shards import LatentShardDataset, LatentShardWriter, encode_latents
from diffusers_mdit.testing import TINY_MDIT, ddim_x0, tiny_mdit, tiny_text_encoder, tiny_vae
from diffusers_mdit.training.checkpointing import batch_indices
from diffusers_mdit.training.trainer import add_arguments, train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location(
    "prepare_latents", os.path.join(ROOT, "training", "prepare_latents.py")
)
prepare_latents = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prepare_latents)

# (width, height) -> (image_scale, aspect_ratio) at resolution 16, by hand: the scale is the
# shorter side over 16 when the image is upscaled, else 1; the aspect ratio is width / height.
SIZES = {(20, 10): (0.625, 2.0), (16, 32): (1.0, 0.5), (12, 12): (0.75, 1.0)}
CAPTIONS = ["a red cat", "a blue dog sitting on a very long bench in the park", "sky", "a bird"]


def prepare(*argv: str) -> dict:
    return prepare_latents.main([*argv, "--resolution", "16", "--dataloader_num_workers", "0"])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    images = []
    for label in ("cats", "dogs"):
        (root / "images" / label).mkdir(parents=True)
        for i, (w, h) in enumerate(SIZES):
            image = PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            image.save(root / "images" / label / f"{i}.png")
            images.append(image)
    with webdataset.TarWriter(str(root / "cc3m-000.tar")) as tar:
        for i, caption in enumerate(CAPTIONS):
            tar.write({"__key__": f"{i:04d}", "jpg": images[i], "txt": caption})
    tiny_vae().save_pretrained(root / "vae")
    encoder, tokenizer = tiny_text_encoder()
    encoder.save_pretrained(root / "t5")
    tokenizer.save_pretrained(root / "t5")
    return root


@pytest.fixture(scope="module")
def latents(folder):
    prepare("--train_data_dir", str(folder / "images"), "--output_dir", str(folder / "latents"),
            "--pretrained_vae_model_name_or_path", str(folder / "vae"), "--shard_size", "4",
            "--batch_size", "4")  # fmt: skip
    return folder / "latents"


@pytest.fixture(scope="module")
def text_latents(folder):
    prepare("--webdataset_urls", str(folder / "cc3m-{000..000}.tar"),
            "--output_dir", str(folder / "text"), "--pretrained_vae_model_name_or_path",
            str(folder / "vae"), "--text_encoder_name_or_path", str(folder / "t5"))  # fmt: skip
    return folder / "text"


def test_latent_shards_round_trip(folder, latents):
    data = LatentShardDataset(str(latents))
    meta = json.loads((latents / "metadata.json").read_text())
    assert meta["vae"] == str(folder / "vae") and meta["scaling_factor"] == 0.18215
    assert meta["num_classes"] == 2 and meta["class_names"] == ["cats", "dogs"]
    assert meta["num_samples"] == len(data) == 6 and meta["shards"] == [
        "shard-000000.tar", "shard-000001.tar"]  # fmt: skip
    assert data.latent_shape == (4, 8, 8) and data.has_flips and not data.has_text
    images, vae = ImageDataset(train_data_dir=str(folder / "images"), resolution=16), tiny_vae()
    pixels = torch.stack([images[i]["pixel_values"] for i in range(6)])
    with torch.no_grad():
        expected = vae.encode(pixels).latent_dist.mean * 0.18215
        flipped = vae.encode(pixels.flip(-1)).latent_dist.mean * 0.18215
    stored = torch.stack([data[i]["latents"] for i in range(6)])
    stored_flips = torch.stack([data.item(i, flip=True)["latents"] for i in range(6)])
    torch.testing.assert_close(stored, expected, atol=2e-3, rtol=2e-3)  # float16 storage
    torch.testing.assert_close(stored_flips, flipped, atol=2e-3, rtol=2e-3)
    # The flipped image's latent is not the flipped latent: the VAE is not flip-equivariant.
    assert (stored_flips - stored.flip(-1)).abs().max() > 0.01
    rows = {(data.label(i), data[i]["image_scale"], data[i]["aspect_ratio"]) for i in range(6)}
    assert rows == {(label, *aux) for label in (0, 1) for aux in SIZES.values()}
    scale, aspect = data.aux_conditions([5, 0])
    assert (scale[0], aspect[0]) == (data[5]["image_scale"], data[5]["aspect_ratio"])


def test_a_glob_selects_shards_and_reads_them_at_random(latents):
    everything = LatentShardDataset(str(latents))
    second = LatentShardDataset(str(latents / "shard-000001.tar"))
    assert len(second) == 2
    for i in (1, 0):
        torch.testing.assert_close(second[i]["latents"], everything[4 + i]["latents"])
        assert second.label(i) == everything.label(4 + i)


def test_flips_are_drawn_for_the_global_batch_from_the_step(latents):
    from diffusers_mdit.training.loader import draw_flips, training_loader

    data = LatentShardDataset(str(latents))
    ids = batch_indices(len(data), 6, 3, seed=0)
    whole = next(iter(training_loader(data, 6, 0, 3, 4, slice(None), random_flip=True)))
    halves = [next(iter(training_loader(data, 6, 0, 3, 4, s, random_flip=True)))
              for s in (slice(0, 3), slice(3, 6))]  # fmt: skip
    expected = draw_flips(0, 3, 6)
    assert 0 < sum(expected) < 6
    assert whole["index"].tolist() == ids
    halves_latents = torch.cat([half["latents"] for half in halves])
    for k, (i, flip) in enumerate(zip(ids, expected, strict=True)):
        assert torch.equal(whole["latents"][k], data.item(i, flip=flip)["latents"])
        assert torch.equal(whole["latents"][k], halves_latents[k])


def test_latents_are_stored_as_the_pipelines_decode_them():
    vae = tiny_vae()
    vae.register_to_config(scaling_factor=1.5, shift_factor=0.25)
    pipe = MDiTPipeline(transformer=tiny_mdit(in_channels=4), scheduler=ddim_x0(), vae=vae)
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        direct = vae.decode(vae.encode(image).latent_dist.mean).sample
        decoded = pipe.decode(encode_latents(vae, image), output_type="pt")
    torch.testing.assert_close(decoded, (direct / 2 + 0.5).clamp(0, 1))


def test_text_shards_round_trip(folder, text_latents):
    data = LatentShardDataset(str(text_latents))
    meta = data.metadata
    assert meta["text_encoder"] == str(folder / "t5") and meta["max_sequence_length"] == 16
    assert meta["num_classes"] == 0 and meta["text_embedding_shape"] == [16, 32]
    assert len(data) == 4 and data.has_text and not data.has_flips
    assert [data.caption(i) for i in range(4)] == CAPTIONS
    assert [data.label(i) for i in range(4)] == [-1] * 4
    # ByT5 tokens are the UTF-8 bytes and </s>: the long caption is cut to 16 tokens.
    masks = [data[i]["encoder_attention_mask"] for i in range(4)]
    assert [int(m.sum()) for m in masks] == [10, 16, 4, 7]
    encoder, tokenizer = tiny_text_encoder()
    pipe = MDiTTextToImagePipeline(
        transformer=tiny_mdit(cross_attention_dim=32), scheduler=ddim_x0(),
        text_encoder=encoder, tokenizer=tokenizer)  # fmt: skip
    states, mask = pipe.encode_prompt(CAPTIONS)
    stored = torch.stack([data[i]["encoder_hidden_states"] for i in range(4)])
    torch.testing.assert_close(stored, states, atol=5e-3, rtol=2e-3)  # float16 storage
    assert torch.equal(torch.stack(masks), mask)
    assert (data.item(0)["aspect_ratio"], data.item(0)["image_scale"]) == (2.0, 0.625)
    with pytest.raises(ValueError, match="no flipped latents"):
        data.item(0, flip=True)


def flags(tmp_path, output, model=TINY_MDIT, **extra) -> argparse.Namespace:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(model))
    values = dict(output_dir=output, model_config=config, train_batch_size=4, max_train_steps=2,
                  checkpointing_steps=1, learning_rate=2e-3, report_to="none", seed=1)  # fmt: skip
    values.update(extra)
    argv = []
    for key, value in values.items():
        argv += [f"--{key}"] if value is None else [f"--{key}", str(value)]
    return add_arguments(argparse.ArgumentParser()).parse_args(argv)


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors"))


def test_training_from_latent_shards_resumes_exactly_and_saves_a_pipeline_with_the_vae(
    tmp_path, latents
):
    shards = dict(train_shards=latents, random_flip=None, use_aux_conditions=None)
    reference = train(flags(tmp_path, tmp_path / "a", validation_steps=2, num_validation_steps=1,
                            **shards))  # fmt: skip
    assert os.path.isfile(tmp_path / "a" / "samples" / "step-000002.png")
    train(flags(tmp_path, tmp_path / "b", **{**shards, "max_train_steps": 1}))
    resumed = train(flags(tmp_path, tmp_path / "b", resume_from_checkpoint="latest", **shards))
    expected, actual = weights(reference.pipeline_dir), weights(resumed.pipeline_dir)
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    pipe = MDiTPipeline.from_pretrained(reference.pipeline_dir)
    config = pipe.transformer.config
    assert pipe.vae is not None and config.use_aux_conditions and config.num_classes == 2
    assert (config.in_channels, config.sample_size) == (4, 8)
    images = pipe(class_labels=[1], image_scale=1.0, aspect_ratio=1.0, num_inference_steps=2,
                  output_type="pt").images  # fmt: skip
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


def test_training_from_text_shards_saves_a_text_to_image_pipeline(tmp_path, text_latents):
    result = train(flags(tmp_path, tmp_path / "out", train_shards=text_latents, validation_steps=2,
                         num_validation_steps=1))  # fmt: skip
    assert np.isfinite(result.final_loss)
    assert os.path.isfile(tmp_path / "out" / "samples" / "step-000002.png")
    pipe = MDiTTextToImagePipeline.from_pretrained(result.pipeline_dir)
    assert pipe.transformer.config.cross_attention_dim == 32
    assert pipe.transformer.config.num_classes == 0 and pipe.vae is not None
    images = pipe("a red cat", num_inference_steps=2, output_type="pt").images
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


def test_unfinished_or_reused_shard_folders_are_reported(tmp_path, latents):
    with pytest.raises(ValueError, match="matches no folder or shards"):
        LatentShardDataset(str(tmp_path / "nope"))
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "shard-000000.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="did not finish"):
        LatentShardDataset(str(tmp_path / "partial"))
    with pytest.raises(ValueError, match="already holds latent shards"):
        LatentShardWriter(str(latents))
    with pytest.raises(ValueError, match="do not exist"):
        prepare("--webdataset_urls", str(tmp_path / "cc3m-{000..002}.tar"),
                "--output_dir", str(tmp_path / "x"))  # fmt: skip
    with pytest.raises(ValueError, match="does not exist"):
        prepare("--train_data_dir", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "x"))


def test_training_errors_name_the_fix(tmp_path, latents, text_latents):
    def fails(match, **extra):
        with pytest.raises(ValueError, match=match):
            train(flags(tmp_path, tmp_path / "out", **extra))

    (tmp_path / "empty").mkdir()
    fails("holds no .tar shards", train_shards=tmp_path / "empty")
    fails("no text embeddings", train_shards=latents, model={**TINY_MDIT, "cross_attention_dim": 8})
    fails("store no flipped latents", train_shards=text_latents, random_flip=None)
    fails("needs --train_shards", use_aux_conditions=None)
    fails("need an MDiT", train_shards=text_latents,
          model=dict(_class_name="DiffiTTransformer2DModel", hidden_size=32, num_layers=1,
                     num_attention_heads=2))  # fmt: skip
    other = tiny_vae()
    other.register_to_config(scaling_factor=0.13025)
    other.save_pretrained(tmp_path / "other-vae")
    fails("not the VAE of these latents", train_shards=latents,
          pretrained_vae_model_name_or_path=tmp_path / "other-vae")  # fmt: skip
