"""Sampling to an image folder: layout, labels, datasets loading, bit-exact resuming."""

from __future__ import annotations

import json
import os

import datasets
import pytest

from diffusers_mdit import MDiTPipeline, MDiTTextToImagePipeline
from diffusers_mdit.evaluation import generate_samples
from diffusers_mdit.testing import ddim_x0, tiny_mdit, tiny_text_encoder

SAMPLING = dict(num_inference_steps=2, progress=False)


@pytest.fixture(scope="module")
def pipeline():
    return MDiTPipeline(transformer=tiny_mdit(in_channels=3, num_classes=10), scheduler=ddim_x0())


def png_bytes(folder):
    names = sorted(n for n in os.listdir(folder) if n.endswith(".png"))
    return {name: open(os.path.join(folder, name), "rb").read() for name in names}


def test_folder_loads_as_a_datasets_dataset_with_balanced_labels(pipeline, tmp_path):
    result = generate_samples(pipeline, str(tmp_path), 12, batch_size=5, **SAMPLING)
    assert (result.num_samples, result.num_generated, result.num_skipped) == (12, 12, 0)
    data = datasets.load_dataset("imagefolder", data_dir=str(tmp_path), split="train")
    assert len(data) == 12 and data["label"][:] == [i % 10 for i in range(12)]
    assert data[0]["image"].size == (8, 8) and data[0]["image"].mode == "RGB"
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_interrupted_run_resumes_to_the_same_files_bit_exactly(pipeline, tmp_path):
    generate_samples(pipeline, str(tmp_path / "straight"), 10, batch_size=4, **SAMPLING)
    expected = png_bytes(tmp_path / "straight")
    assert len(set(expected.values())) == 10  # every sample has its own noise

    # Killed during the second batch: the first batch's files are on disk, nothing else.
    calls = 0
    original = type(pipeline).__call__

    def crash_on_second_call(self, *args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    folder = str(tmp_path / "resumed")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(pipeline), "__call__", crash_on_second_call)
        with pytest.raises(KeyboardInterrupt):
            generate_samples(pipeline, folder, 10, batch_size=4, **SAMPLING)
    assert sorted(png_bytes(folder)) == ["000000.png", "000001.png", "000002.png", "000003.png"]
    result = generate_samples(pipeline, folder, 10, batch_size=4, **SAMPLING)
    assert (result.num_generated, result.num_skipped) == (6, 4)
    assert png_bytes(folder) == expected

    # A smaller run extended to the full size gives the same files too.
    folder = str(tmp_path / "extended")
    generate_samples(pipeline, folder, 8, batch_size=4, **SAMPLING)
    result = generate_samples(pipeline, folder, 10, batch_size=4, **SAMPLING)
    assert (result.num_generated, result.num_skipped) == (2, 8)
    assert png_bytes(folder) == expected

    # Nothing left to do: nothing sampled.
    assert generate_samples(pipeline, folder, 10, batch_size=4, **SAMPLING).num_generated == 0


def test_other_settings_in_the_same_folder_are_an_error(pipeline, tmp_path):
    generate_samples(pipeline, str(tmp_path), 2, batch_size=2, seed=0, **SAMPLING)
    with pytest.raises(ValueError, match="seed"):
        generate_samples(pipeline, str(tmp_path), 4, batch_size=2, seed=1, **SAMPLING)
    with open(tmp_path / "generation.json") as f:
        assert json.load(f)["seed"] == 0


def test_unconditional_and_text_to_image_metadata(tmp_path):
    unconditional = MDiTPipeline(transformer=tiny_mdit(in_channels=3), scheduler=ddim_x0())
    generate_samples(unconditional, str(tmp_path / "u"), 3, batch_size=2, **SAMPLING)
    with open(tmp_path / "u" / "metadata.jsonl") as f:
        assert [json.loads(line) for line in f] == [
            {"file_name": f"00000{i}.png"} for i in range(3)
        ]

    encoder, tokenizer = tiny_text_encoder()
    text = MDiTTextToImagePipeline(
        transformer=tiny_mdit(in_channels=3, cross_attention_dim=32),
        scheduler=ddim_x0(),
        text_encoder=encoder,
        tokenizer=tokenizer,
    )
    generate_samples(text, str(tmp_path / "t"), 3, batch_size=2, prompts=["a", "b"], **SAMPLING)
    data = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "t"), split="train")
    assert data["text"][:] == ["a", "b", "a"]
