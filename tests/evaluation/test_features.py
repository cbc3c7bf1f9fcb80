"""The feature extractors' code paths with stand-in networks (nothing is downloaded), and the
errors when a library or weights are missing."""

from __future__ import annotations

import sys
import types
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffusers_mdit.evaluation import (
    CLIPFeatures,
    DINOv2Features,
    ImageSet,
    InceptionV3Features,
    MetricUnavailableError,
    evaluate,
)


def random_images(n, size=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=generator, dtype=torch.uint8)


# -- InceptionV3 through torch-fidelity --------------------------------------------------------


class FakeInceptionV3(nn.Module):
    """torch-fidelity's FeatureExtractorInceptionV3 interface: uint8 in, (pool3, logits) out,
    ``Mixed_6d.branch1x1`` producing 17x17 maps on the way."""

    pool_dim, map_size = 2048, 17

    def __init__(self, name, features_list, feature_extractor_weights_path=None):
        super().__init__()
        assert features_list == ["2048", "logits_unbiased"]
        self.weights_path = feature_extractor_weights_path
        torch.manual_seed(0)
        self.Mixed_6d = nn.Module()
        self.Mixed_6d.branch1x1 = nn.Conv2d(3, 192, 1)
        self.pool3 = nn.Linear(192, self.pool_dim)
        self.fc = nn.Linear(self.pool_dim, 1008)

    def forward(self, x):
        assert x.dtype == torch.uint8
        size = (self.map_size, self.map_size)
        maps = self.Mixed_6d.branch1x1(F.interpolate(x.float() / 255, size=size))
        pool3 = self.pool3(maps.mean((2, 3)))
        return pool3, self.fc(pool3)


def install_torch_fidelity(monkeypatch, cls):
    package = types.ModuleType("torch_fidelity")
    module = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    module.FeatureExtractorInceptionV3 = cls
    monkeypatch.setitem(sys.modules, "torch_fidelity", package)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", module)


def test_inception_features_pool3_logits_and_the_sfid_maps(monkeypatch):
    install_torch_fidelity(monkeypatch, FakeInceptionV3)
    extractor = InceptionV3Features("weights.pth")
    assert extractor.network.weights_path == "weights.pth"
    images = random_images(5)
    features = extractor(images)
    assert features["pool3"].shape == (5, 2048) and features["logits"].shape == (5, 1008)
    with torch.no_grad():
        maps = extractor.network.Mixed_6d.branch1x1(F.interpolate(images.float() / 255, size=17))
    assert features["spatial"].shape == (5, 7 * 17 * 17)  # 2023, as ADM's sFID
    np.testing.assert_allclose(features["spatial"], maps[:, :7].flatten(1).numpy(), rtol=1e-6)


class SmallFakeInceptionV3(FakeInceptionV3):
    """Fewer features: sqrtm of a 2048x2048 matrix takes ~20 s on a small CPU."""

    pool_dim, map_size = 64, 4


def test_inception_metrics_end_to_end_on_stand_in_features(monkeypatch):
    install_torch_fidelity(monkeypatch, SmallFakeInceptionV3)
    images = ImageSet.from_tensor(random_images(40))
    other = ImageSet.from_tensor(random_images(40, seed=1) // 4)  # darker: other features
    names = ["fid", "sfid", "is", "precision", "recall"]
    same = evaluate(images, names, images, batch_size=16)
    assert abs(same["fid"]) < 1e-6 and abs(same["sfid"]) < 1e-6  # sfid: 7 x 4 x 4 features
    assert same["precision"] == same["recall"] == 1.0
    assert same["is"] >= 1.0 and same["is_std"] >= 0.0
    different = evaluate(other, ["fid", "sfid"], images)
    assert different["fid"] > 1e-3 and different["sfid"] > 1e-3


def test_missing_torch_fidelity_names_the_metric_and_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # import fails
    images = ImageSet.from_tensor(random_images(4), labels=[0, 1, 2, 3])
    with pytest.raises(MetricUnavailableError) as error:
        # Fails before any feature of the offline metric is computed.
        evaluate(images, ["fd_classifier", "fid", "sfid"], images)
    message = str(error.value)
    assert message.startswith("fid, sfid unavailable: torch-fidelity")
    assert "pip install 'diffusers-mdit[metrics]'" in message and "torchvision" in message
    assert "fd_classifier and accuracy" in message


def test_missing_inception_weights_say_where_to_put_them(monkeypatch):
    class Offline(FakeInceptionV3):
        def __init__(self, *args, **kwargs):
            raise urllib.error.URLError("no network")

    install_torch_fidelity(monkeypatch, Offline)
    with pytest.raises(MetricUnavailableError) as error:
        InceptionV3Features(metric="is")
    message = str(error.value)
    assert message.startswith("is unavailable: the InceptionV3 weights")
    assert "weights-inception-2015-12-05-6726825d.pth" in message
    assert torch.hub.get_dir() in message and "--inception_weights" in message


# -- DINOv2 through transformers ---------------------------------------------------------------


def test_dinov2_features_from_a_local_folder(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    torch.manual_seed(0)
    Dinov2Model(config).save_pretrained(tmp_path)
    extractor = DINOv2Features(str(tmp_path))
    assert extractor(random_images(3))["cls"].shape == (3, 32)
    images = ImageSet.from_tensor(random_images(12))
    other = ImageSet.from_tensor(random_images(12, seed=1) // 4)
    assert (
        abs(evaluate(images, ["fd_dinov2"], images, dinov2_model=str(tmp_path))["fd_dinov2"]) < 1e-6
    )
    assert evaluate(other, ["fd_dinov2"], images, dinov2_model=str(tmp_path))["fd_dinov2"] > 1e-3


def test_missing_dinov2_weights_say_how_to_get_them(monkeypatch):
    import transformers

    def offline(name, *args, **kwargs):
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load {name}")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", offline)
    with pytest.raises(MetricUnavailableError) as error:
        DINOv2Features()
    message = str(error.value)
    assert message.startswith("fd_dinov2 unavailable: the weights 'facebook/dinov2-large'")
    assert "hf download facebook/dinov2-large" in message
    assert "--dinov2_model" in message and "Hugging Face cache" in message


# -- CLIP through transformers -----------------------------------------------------------------

COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}


class FakeCLIPProcessor:
    """Images -> mean colour, captions -> colour vectors."""

    def __call__(self, images=None, text=None, return_tensors="pt", **kwargs):
        if images is not None:
            colours = [torch.from_numpy(image.reshape(-1, 3).mean(0) / 255) for image in images]
            return {"pixel_values": torch.stack(colours).float()}
        ids = torch.tensor([COLOURS[t] for t in text])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class FakeCLIPModel(nn.Module):
    def get_image_features(self, pixel_values):
        # transformers 5 returns an output whose pooler_output is the projected embedding.
        return types.SimpleNamespace(pooler_output=pixel_values * 3)

    def get_text_features(self, input_ids, attention_mask):
        return input_ids * 0.5  # transformers 4: a tensor


def test_clip_score_through_the_extractor_with_a_stand_in_model():
    colours = torch.tensor([[255, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=torch.uint8)
    images = colours[:, :, None, None].expand(-1, -1, 4, 4).contiguous()
    samples = ImageSet.from_tensor(images, texts=["red", "green", "green", "blue"])
    clip = CLIPFeatures(network=FakeCLIPModel(), processor=FakeCLIPProcessor())
    # Cosines 1, 0, 1, 1 -> 100 * 0.75.
    assert evaluate(samples, ["clip_score"], clip=clip)["clip_score"] == pytest.approx(75.0)


def test_missing_clip_weights_say_how_to_get_them(monkeypatch):
    import transformers

    def offline(name, *args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(transformers.CLIPModel, "from_pretrained", offline)
    with pytest.raises(MetricUnavailableError, match="clip_score unavailable") as error:
        CLIPFeatures()
    assert "openai/clip-vit-large-patch14" in str(error.value)
    assert "--clip_model" in str(error.value)


def test_clip_score_needs_captions():
    images = ImageSet.from_tensor(random_images(2))
    with pytest.raises(ValueError, match="captions"):
        evaluate(
            images,
            ["clip_score"],
            clip=CLIPFeatures(network=FakeCLIPModel(), processor=FakeCLIPProcessor()),
        )
