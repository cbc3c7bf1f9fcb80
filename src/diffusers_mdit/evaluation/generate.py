"""Sampling N images from a pipeline into an image folder, batched and resumable.

The folder is an ``imagefolder`` data set: ``000000.png``, ``000001.png``, ... and a
``metadata.jsonl`` with each file's ``label`` (class-conditional pipelines) or ``text``
(text-to-image pipelines), so ``datasets.load_dataset("imagefolder", data_dir=...)`` loads it
and :mod:`.score` reads the labels for the conditional accuracy and the captions for the CLIP
score. ``generation.json`` records the sampling settings.

Resuming: sample ``i`` starts from noise drawn by its own generator, seeded from ``(seed, i)``
(``numpy.random.SeedSequence``), and batches are always ``[b * batch_size, (b + 1) *
batch_size)``. A batch whose files all exist is skipped; any other batch is sampled whole.
A run interrupted and started again with the same arguments therefore writes the same files,
bit for bit, as an uninterrupted run (files are written to a temporary name and renamed, so an
interruption leaves no half-written PNG). With another ``batch_size`` each sample keeps its
noise, but batched arithmetic may round differently. A larger ``num_samples`` extends a
folder; other settings must match ``generation.json``. Labels are balanced: sample ``i`` gets class
``i % num_classes``, prompt ``i % len(prompts)``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

SETTINGS_FILE = "generation.json"
METADATA_FILE = "metadata.jsonl"


def sample_seed(seed: int, index: int) -> int:
    """The generator seed of sample ``index`` of a run with ``seed``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def sample_file(index: int) -> str:
    return f"{index:06d}.png"


def sample_condition(pipeline, index: int, prompts: list[str] | None) -> dict:
    """The metadata of sample ``index``: ``{"label": i % num_classes}`` for class-conditional
    models, ``{"text": prompt}`` for text-to-image pipelines, ``{}`` otherwise."""
    if prompts is not None:
        return {"text": prompts[index % len(prompts)]}
    num_classes = getattr(pipeline.transformer.config, "num_classes", 0) or 0
    return {"label": index % num_classes} if num_classes else {}


@dataclass
class GeneratedSamples:
    """A sample folder: where, how many, and how many this call sampled."""

    output_dir: str
    num_samples: int
    num_generated: int
    num_skipped: int


def generate_samples(
    pipeline,
    output_dir: str,
    num_samples: int,
    batch_size: int = 16,
    seed: int = 0,
    num_inference_steps: int = 50,
    guidance_scale: float = 1.0,
    prompts: list[str] | None = None,
    progress: bool = True,
    **pipeline_kwargs,
) -> GeneratedSamples:
    """Write ``num_samples`` images of ``pipeline`` to ``output_dir`` (see the module
    docstring for the layout, seeding and resuming).

    Args:
        pipeline: An ``MDiTPipeline``, ``DiffiTPipeline`` or (with ``prompts``)
            ``MDiTTextToImagePipeline``.
        output_dir: The image folder; created if needed.
        num_samples: Total number of images the folder should hold.
        batch_size: Images per pipeline call.
        seed: Seed of the whole run; sample ``i`` uses :func:`sample_seed`.
        num_inference_steps, guidance_scale: Passed to the pipeline.
        prompts: Captions for text-to-image pipelines, used in turn.
        progress: Show a tqdm progress bar over the samples.
        pipeline_kwargs: Further pipeline arguments (``height``, ``width``, ``eta``, ...);
            JSON-serialisable, recorded in ``generation.json``.
    """
    if num_samples < 1 or batch_size < 1:
        raise ValueError(
            f"num_samples and batch_size must be >= 1, got {num_samples}, {batch_size}."
        )
    settings = {
        "pipeline": type(pipeline).__name__,
        "seed": seed,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "prompts": prompts,
        **pipeline_kwargs,
    }
    os.makedirs(output_dir, exist_ok=True)
    settings_path = os.path.join(output_dir, SETTINGS_FILE)
    if os.path.isfile(settings_path):
        with open(settings_path) as f:
            previous = json.load(f)
        previous.pop("num_samples", None)
        if previous != settings:
            changed = sorted(
                k for k in {*previous, *settings} if previous.get(k) != settings.get(k)
            )
            raise ValueError(
                f"{output_dir!r} holds samples generated with other settings ({', '.join(changed)} "
                f"differ from {SETTINGS_FILE}); use another output_dir or the same settings."
            )
    with open(settings_path, "w") as f:
        json.dump({**settings, "num_samples": num_samples}, f, indent=2)

    pipeline.set_progress_bar_config(disable=True)
    device = pipeline._execution_device
    batches = [
        range(start, min(start + batch_size, num_samples))
        for start in range(0, num_samples, batch_size)
    ]
    todo = [
        b
        for b in batches
        if not all(os.path.isfile(os.path.join(output_dir, sample_file(i))) for i in b)
    ]
    skipped = num_samples - sum(len(b) for b in todo)
    with tqdm(
        total=num_samples, initial=skipped, desc="samples", unit="img", disable=not progress
    ) as bar:
        for batch in todo:
            generators = [torch.Generator(device).manual_seed(sample_seed(seed, i)) for i in batch]
            conditions = [sample_condition(pipeline, i, prompts) for i in batch]
            if prompts is not None:
                inputs = {"prompt": [c["text"] for c in conditions]}
            elif conditions[0]:
                inputs = {"class_labels": [c["label"] for c in conditions]}
            else:
                inputs = {"batch_size": len(batch)}
            images = pipeline(
                **inputs,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generators,
                output_type="pil",
                **pipeline_kwargs,
            ).images
            for index, image in zip(batch, images, strict=True):
                path = os.path.join(output_dir, sample_file(index))
                temporary = os.path.join(output_dir, f".{sample_file(index)}.tmp")
                image.save(temporary, format="PNG")
                os.replace(temporary, path)
            bar.update(len(batch))

    with open(os.path.join(output_dir, METADATA_FILE), "w") as f:
        for index in range(num_samples):
            row = {"file_name": sample_file(index), **sample_condition(pipeline, index, prompts)}
            f.write(json.dumps(row) + "\n")
    return GeneratedSamples(output_dir, num_samples, num_samples - skipped, skipped)
