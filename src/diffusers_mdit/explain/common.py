"""Shared pieces of the analyses: loading a model or pipeline folder, naming blocks, capturing
block outputs with hooks, JSON and figure output."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..families import FAMILIES


@dataclass
class LoadedModel:
    """A model to analyse, with the pipeline it came in (``None`` for a bare model folder;
    the sampling-time analyses need one)."""

    model: nn.Module
    pipeline: Any | None
    path: str

    def require_pipeline(self, analysis: str):
        if self.pipeline is None:
            raise ValueError(
                f"{analysis} samples images, so it needs a pipeline folder (with "
                f"model_index.json), but {self.path!r} holds only a model."
            )
        return self.pipeline


def load_for_analysis(
    path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> LoadedModel:
    """Load a pipeline folder (``model_index.json``: our pipelines, by ``_class_name``) or a
    model folder (``config.json``), in eval mode on ``device``."""
    from .. import pipelines
    from ..families import load_model

    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"{path!r} is not a folder: pass a pipeline folder (model_index.json) or a model "
            "folder (config.json) saved with save_pretrained."
        )
    pipeline = None
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index) and not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"{path!r} holds neither model_index.json nor config.json: pass a pipeline folder "
            "or a model folder saved with save_pretrained."
        )
    if os.path.isfile(index):
        with open(index) as f:
            names = json.load(f)
        name = names.get("_class_name")
        name = name[-1] if isinstance(name, list) else name
        # A Hub folder names its code file ("pipeline"); its transformer says which we have.
        if not hasattr(pipelines, str(name)):
            transformer = names.get("transformer", [None, None])[1]
            name = {"DiffiTTransformer2DModel": "DiffiTPipeline"}.get(transformer, "MDiTPipeline")
            if names.get("text_encoder", [None, None])[1]:
                name = "MDiTTextToImagePipeline"
        pipeline = getattr(pipelines, name).from_pretrained(path)
        pipeline.to(device)
        if dtype != torch.float32:
            pipeline.to(dtype=dtype)
        pipeline.set_progress_bar_config(disable=True)
        model = pipeline.transformer
    else:
        model = load_model(path).to(device=device, dtype=dtype)
    model.eval().requires_grad_(False)
    return LoadedModel(model=model, pipeline=pipeline, path=path)


# -- sampling -------------------------------------------------------------------------------


def sampling_labels(pipeline, count: int, start: int = 0, analysis: str = "This analysis") -> dict:
    """Pipeline arguments for ``count`` images: classes ``start, start + 1, ...`` cycled for a
    class-conditional model, ``batch_size`` for an unconditional one. Text-to-image pipelines
    (which need prompts) are refused."""
    import inspect

    if "class_labels" not in inspect.signature(pipeline.__call__).parameters:
        raise ValueError(
            f"{analysis} samples class-conditional or unconditional images, but "
            f"{type(pipeline).__name__} takes no class_labels (text-to-image pipelines need "
            "prompts); use an MDiTPipeline folder."
        )
    classes = pipeline.transformer.config.num_classes
    if classes:
        return {"class_labels": [(start + i) % classes for i in range(count)]}
    return {"batch_size": count}


def add_sampling_arguments(parser, num_images: int) -> None:
    """``--num_images``, ``--num_inference_steps`` (25, the paper's analyses) and
    ``--guidance_scale`` (1: none) for the analyses that sample."""
    parser.add_argument("--num_images", type=int, default=num_images, help="images to sample")
    parser.add_argument("--num_inference_steps", type=int, default=25, help="sampling steps")
    parser.add_argument("--guidance_scale", type=float, default=1.0, help="1 = no guidance")


# -- blocks ---------------------------------------------------------------------------------


def has_block_levels(model: nn.Module) -> bool:
    """Whether ``model``'s family lists its blocks by level (MDiT; see
    :class:`~diffusers_mdit.families.ModelFamily`)."""
    return any(f.block_levels and isinstance(model, f.model_class) for f in FAMILIES.values())


def require_block_levels(model: nn.Module, analysis: str) -> None:
    """Refuse models whose blocks have no levels for an ``analysis`` that reads them."""
    if not has_block_levels(model):
        raise ValueError(
            f"{analysis} reads the blocks of an MDiT level by level, but "
            f"{type(model).__name__} is not an MDiT; use an MDiTTransformer2DModel or a "
            "pipeline holding one."
        )


def block_names(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``("outer_in.0", block), ("core.0", block), ("aggregate.0", block), ...`` in execution
    order, for models with block levels (MDiT)."""
    require_block_levels(model, "Naming blocks by level")
    counts: dict[str, int] = {}
    named = []
    for level, block in model.blocks_in_order():
        index = counts.get(level, 0)
        counts[level] = index + 1
        named.append((f"{level}.{index}", block))
    return named


def normalised_depth(count: int) -> list[float]:
    """Block ``i`` of ``count`` at depth ``(i + 0.5) / count``, in (0, 1)."""
    return [(i + 0.5) / count for i in range(count)]


@contextlib.contextmanager
def capture_outputs(modules: dict[str, nn.Module], detach: bool = True):
    """Record each module's output on every forward call: yields ``{name: [outputs...]}``."""
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    handles = []
    for name, module in modules.items():

        def hook(_module, _inputs, output, name=name):
            output = output[0] if isinstance(output, tuple) else output
            outputs[name].append(output.detach() if detach else output)

        handles.append(module.register_forward_hook(hook))
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


# -- output ---------------------------------------------------------------------------------


def to_jsonable(value: Any) -> Any:
    """Dataclasses, tensors, numpy arrays and scalars to plain lists, dicts and floats
    (non-finite floats become ``None``)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(value: Any, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(to_jsonable(value), f, indent=2)
    return path


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    pyplot().close(figure)
    return path
