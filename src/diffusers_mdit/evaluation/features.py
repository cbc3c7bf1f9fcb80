"""Feature extractors for the metrics, each from an established implementation.

Every extractor maps a batch of ``(B, 3, H, W)`` uint8 images (what a PNG holds) to named
``(B, D)`` float arrays; :mod:`.metrics` turns features into numbers.

- :class:`InceptionV3Features`: torch-fidelity's ``FeatureExtractorInceptionV3``, the TF-1
  FID Inception network ported bit-exactly (with TF's bilinear resize to 299). Its ``pool3``
  (2048) features give FID and precision/recall, ``logits`` (the 1008 unbiased logits, as
  torch-fidelity feeds its Inception Score) give IS, and ``spatial`` gives sFID: the first 7
  channels of ``Mixed_6d.branch1x1``, the port of the TF graph's ``mixed_6/conv`` (torch-
  fidelity's weight conversion maps ``mixed_6`` to ``Mixed_6d``), 7 x 17 x 17 = 2023 features
  as in the ADM evaluator. torch-fidelity was chosen over torchmetrics (whose FID/IS/KID wrap
  torch-fidelity's network anyway), clean-fid and pytorch-fid because it exposes the network
  as a module (so the sFID layer can be hooked), takes uint8 tensors, and reproduces the
  reference TF numbers. All of these need torchvision beside torch.
- :class:`DINOv2Features`: DINOv2 from ``transformers`` (``facebook/dinov2-large``, the ViT-L/14
  of Stein et al. 2023), the final-norm CLS token after a bicubic resize to 224 and ImageNet
  normalisation, as in their dgm-eval.
- :class:`CLIPFeatures`: CLIP from ``transformers`` (``openai/clip-vit-large-patch14``, the
  torchmetrics default) with its own processor, as torchmetrics' CLIP score.
- :class:`ClassifierFeatures`: the offline :class:`~.classifier.ReferenceClassifier`.

Nothing is downloaded at import. When a library or its weights are missing, construction
raises :class:`MetricUnavailableError` naming the metric, what is missing and how to get it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .classifier import ReferenceClassifier

INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
DINOV2_MODEL = "facebook/dinov2-large"
CLIP_MODEL = "openai/clip-vit-large-patch14"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MetricUnavailableError(RuntimeError):
    """A metric's library or weights are missing; the message says how to get them."""

    def __init__(self, metric: str, missing: str, remedy: str, cause: BaseException):
        self.metric = metric
        super().__init__(
            f"{metric} unavailable: {missing} ({type(cause).__name__}: {cause}). {remedy}"
        )


def _hf_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _load_hf(loader, name: str, metric: str, option: str):
    """``loader(name)`` (a ``from_pretrained``), with :class:`MetricUnavailableError` when the
    weights are neither cached nor downloadable."""
    try:
        return loader(name)
    except (OSError, ValueError) as error:
        raise MetricUnavailableError(
            metric,
            f"the weights {name!r} are not in the Hugging Face cache ({_hf_cache()}) and could "
            "not be downloaded",
            f"On a machine with internet run `hf download {name}` and copy the "
            f"cache (or set HF_HOME), or pass {option} with a local folder saved by "
            "save_pretrained.",
            error,
        ) from error


class InceptionV3Features:
    """torch-fidelity's InceptionV3: ``pool3`` (2048), ``logits`` (1008), ``spatial`` (2023).

    Args:
        weights_path: A local copy of torch-fidelity's ``weights-inception-2015-12-05-
            6726825d.pth``; ``None`` uses (or downloads into) the torch hub cache.
        device: Where the network runs.
        metric: The metric name(s) for error messages.
    """

    keys = ("pool3", "logits", "spatial")

    def __init__(
        self,
        weights_path: str | None = None,
        device: str | torch.device = "cpu",
        metric: str = "fid",
    ):
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except Exception as error:  # ImportError, or torchvision's operators failing to load
            raise MetricUnavailableError(
                metric,
                "torch-fidelity (with a torchvision that matches torch) cannot be imported",
                "Install it with `pip install 'diffusers-mdit[metrics]'` next to the "
                "torchvision build that matches your torch (pytorch.org/get-started); or use "
                "the offline metrics fd_classifier and accuracy.",
                error,
            ) from error
        try:
            network = FeatureExtractorInceptionV3(
                "inception-v3-compat",
                ["2048", "logits_unbiased"],
                feature_extractor_weights_path=weights_path,
            )
        except Exception as error:  # URLError / HTTPError / OSError when offline
            raise MetricUnavailableError(
                metric,
                f"the InceptionV3 weights {INCEPTION_WEIGHTS} are not in "
                f"{torch.hub.get_dir()}/checkpoints and could not be downloaded",
                "Download them from torch-fidelity's GitHub release v0.2.0 into that folder, "
                "or pass --inception_weights PATH.",
                error,
            ) from error
        self.network = network.to(device)
        self.device = device
        self._spatial: list[torch.Tensor] = []
        self.network.Mixed_6d.branch1x1.register_forward_hook(
            lambda _module, _inputs, output: self._spatial.append(output[:, :7])
        )

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        self._spatial.clear()
        pool3, logits = self.network(images.to(self.device))
        spatial = self._spatial.pop().flatten(1)
        return {
            "pool3": pool3.double().cpu().numpy(),
            "logits": logits.double().cpu().numpy(),
            "spatial": spatial.double().cpu().numpy(),
        }


class DINOv2Features:
    """DINOv2's CLS token (``cls``), for DINOv2-FID.

    Args:
        model: Hub name or local folder of a ``transformers`` DINOv2 model.
        device: Where the network runs.
    """

    keys = ("cls",)

    def __init__(self, model: str = DINOV2_MODEL, device: str | torch.device = "cpu"):
        from transformers import AutoModel

        network = _load_hf(AutoModel.from_pretrained, model, "fd_dinov2", "--dinov2_model")
        self.network = network.to(device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        x = images.to(self.device).float() / 255
        x = F.interpolate(x, size=(224, 224), mode="bicubic", antialias=True).clamp(0, 1)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        x = ((x - mean) / std).to(self.network.dtype)
        cls = self.network(pixel_values=x).last_hidden_state[:, 0]
        return {"cls": cls.double().cpu().numpy()}


def _embeddings(output) -> torch.Tensor:
    """``get_*_features`` returns a tensor (transformers 4) or an output whose
    ``pooler_output`` is the projected embedding (transformers 5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class CLIPFeatures:
    """CLIP image embeddings (``image``) and, through :meth:`text`, caption embeddings.

    Args:
        model: Hub name or local folder of a ``transformers`` CLIP model and processor.
        device: Where the network runs.
        network, processor: Already loaded ones instead of ``model``.
    """

    keys = ("image",)

    def __init__(
        self,
        model: str = CLIP_MODEL,
        device: str | torch.device = "cpu",
        network=None,
        processor=None,
    ):
        if network is None or processor is None:
            from transformers import CLIPModel, CLIPProcessor

            network = _load_hf(CLIPModel.from_pretrained, model, "clip_score", "--clip_model")
            processor = _load_hf(CLIPProcessor.from_pretrained, model, "clip_score", "--clip_model")
        self.network = network.to(device).eval()
        self.processor = processor
        self.device = device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        arrays = [image.permute(1, 2, 0).cpu().numpy() for image in images]
        pixels = self.processor(images=arrays, return_tensors="pt")["pixel_values"]
        embeds = _embeddings(self.network.get_image_features(pixel_values=pixels.to(self.device)))
        return {"image": embeds.double().cpu().numpy()}

    @torch.no_grad()
    def text(self, texts: list[str]) -> np.ndarray:
        """``(N, D)`` caption embeddings (captions longer than CLIP's 77 tokens truncated)."""
        tokens = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True)
        embeds = self.network.get_text_features(
            input_ids=tokens["input_ids"].to(self.device),
            attention_mask=tokens["attention_mask"].to(self.device),
        )
        return _embeddings(embeds).double().cpu().numpy()


class ClassifierFeatures:
    """The offline classifier's penultimate ``features`` and predicted ``classes``."""

    keys = ("features", "classes")

    def __init__(self, classifier: ReferenceClassifier):
        self.classifier = classifier

    def __call__(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        return {
            "features": self.classifier.features(images),
            "classes": self.classifier.predict(images),
        }
