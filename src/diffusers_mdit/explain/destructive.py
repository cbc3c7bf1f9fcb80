"""Destructive testing (MDiT paper appendix M, figures 89-91).

Switch off one part of the model at a time and re-sample with the same seed and class labels:

- ``rope``: bypass one block's RoPE rotation (every angle ``theta_i = 0``, M.1, figure 89);
- ``identity``: replace one block with the identity ``h = x`` (M.2, figure 90);
- ``kernel``: shrink one outer block's neighborhood-attention kernel (7 -> 5, 3 in the paper;
  M.3, figure 91).

Each switch is a context manager that changes exactly one thing and restores it on exit,
also when an exception is raised inside. For every variant the mean absolute difference to
the baseline images and the PSNR against them (images in ``[0, 1]``) are reported; the
baseline is sampled twice and the difference of the two (0 on a deterministic device) is the
noise floor below which a variant's delta means nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .common import (
    add_sampling_arguments,
    block_names,
    pyplot,
    require_block_levels,
    sampling_labels,
    save_figure,
)

HELP = "Destructive testing: re-sample without each block's RoPE, block or full kernel (app. M)."

TESTS = ("rope", "identity", "kernel")
OUTER_LEVELS = ("outer_in", "outer_out")


# -- switches -------------------------------------------------------------------------------


def _self_attention(block: nn.Module) -> nn.Module:
    attention = getattr(block, "attn", None)
    if attention is None or not hasattr(attention, "rope"):
        raise ValueError(
            f"{type(block).__name__} has no self-attention with RoPE (``.attn.rope``); pass an "
            "MDiT block (OuterBlock, CoreBlock or AggregateBlock)."
        )
    return attention


@contextlib.contextmanager
def rope_disabled(block: nn.Module) -> Iterator[nn.Module]:
    """Bypass the RoPE rotation of ``block``'s self-attention (``theta_i = 0`` for every
    channel, appendix M.1) inside the ``with``; the previous setting is restored on exit."""
    rope = _self_attention(block).rope
    before = rope.enabled
    rope.enabled = False
    try:
        yield block
    finally:
        rope.enabled = before


@contextlib.contextmanager
def block_as_identity(block: nn.Module) -> Iterator[nn.Module]:
    """Replace ``block`` by the identity ``h = x`` (appendix M.2) inside the ``with``.

    A forward hook returns the block's input ``x`` (its first argument) as its output. The hook
    runs before any other forward hook of the block, so hooks that record the block's output
    (e.g. :func:`~diffusers_mdit.explain.common.capture_outputs`) see ``x``.
    """

    def identity(_module, args, kwargs, _output):
        return args[0] if args else kwargs["x"]

    handle = block.register_forward_hook(identity, prepend=True, with_kwargs=True)
    try:
        yield block
    finally:
        handle.remove()


def check_kernel_size(kernel_size: int) -> int:
    """``kernel_size`` if it is an odd positive int (a window centred on its token)."""
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, (int, np.integer)):
        raise ValueError(f"Kernel size must be an odd positive int, got {kernel_size!r}.")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(
            f"Kernel size must be an odd positive int (centred window), got {kernel_size}; "
            "use e.g. 5 or 3."
        )
    return int(kernel_size)


@contextlib.contextmanager
def outer_kernel(block: nn.Module, kernel_size: int) -> Iterator[nn.Module]:
    """Run ``block``'s neighborhood attention with window ``kernel_size`` (appendix M.3) inside
    the ``with``; its own kernel size is restored on exit."""
    kernel_size = check_kernel_size(kernel_size)
    attention = _self_attention(block)
    before = attention.kernel_size
    if before is None:
        raise ValueError(
            f"{type(block).__name__} uses global self-attention, so it has no neighborhood "
            "kernel to change; pass an outer block (or a core block with neighborhood attention)."
        )
    attention.kernel_size = kernel_size
    try:
        yield block
    finally:
        attention.kernel_size = before


# -- the test -------------------------------------------------------------------------------


@dataclass
class Variant:
    """One switched-off part and how far its images moved from the baseline.

    Attributes:
        test: ``"rope"``, ``"identity"`` or ``"kernel"``.
        block: Block name (``"core.2"``), as in :func:`~diffusers_mdit.explain.common.block_names`.
        kernel: The neighborhood kernel of a ``"kernel"`` variant, else ``None``.
        mean_abs_delta: Mean ``|variant - baseline|`` over all pixels, images in ``[0, 1]``.
        max_abs_delta: Largest ``|variant - baseline|``.
        psnr: ``10 log10(1 / MSE)`` against the baseline in dB (``inf`` when identical).
    """

    test: str
    block: str
    level: str
    kernel: int | None
    mean_abs_delta: float
    max_abs_delta: float
    psnr: float

    @property
    def label(self) -> str:
        """The block name, with ``", k=5"`` for kernel variants."""
        return self.block if self.kernel is None else f"{self.block}, k={self.kernel}"


@dataclass
class DestructiveResult:
    """Baseline settings and one :class:`Variant` per switched-off part.

    Attributes:
        class_labels: Labels of the images (``None`` for an unconditional model).
        baseline_kernels: Each outer block's own neighborhood kernel.
        baseline_repeat_max_abs_delta: Largest difference between two baseline samplings
            (0 on a deterministic device): the noise floor of the deltas.
        images: ``"baseline"`` and each variant's ``(test, label)`` -> images ``(B, C, H, W)``
            in ``[0, 1]``, for :func:`plot_destructive` (not written to JSON).
    """

    num_images: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    class_labels: list[int] | None
    baseline_kernels: dict[str, int]
    baseline_repeat_max_abs_delta: float
    variants: list[Variant]
    images: dict = field(default_factory=dict, repr=False)

    def of_test(self, test: str) -> list[Variant]:
        return [v for v in self.variants if v.test == test]


def image_deltas(images: torch.Tensor, baseline: torch.Tensor) -> tuple[float, float, float]:
    """Mean and max ``|images - baseline|`` and the PSNR in dB (images in ``[0, 1]``)."""
    delta = (images.double() - baseline.double()).abs()
    mse = float(delta.square().mean())
    psnr = math.inf if mse == 0 else 10 * math.log10(1.0 / mse)
    return float(delta.mean()), float(delta.max()), psnr


def _check_tests(tests: Sequence[str]) -> tuple[str, ...]:
    unknown = [t for t in tests if t not in TESTS]
    if unknown or not tests:
        raise ValueError(f"Unknown destructive tests {unknown}; choose from {', '.join(TESTS)}.")
    return tuple(tests)


def _named_blocks(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """``(name, level, block)`` in execution order (names are ``"<level>.<index>"``)."""
    return [(name, name.rsplit(".", 1)[0], block) for name, block in block_names(model)]


def _variants(model: nn.Module, tests: Sequence[str], kernels: Sequence[int]):
    """``(test, block name, level, kernel, switch)`` for every variant, in the order of
    ``tests`` and then execution order."""
    variants = []
    for test in tests:
        for name, level, block in _named_blocks(model):
            if test == "rope":
                variants.append((test, name, level, None, lambda b=block: rope_disabled(b)))
            elif test == "identity":
                variants.append((test, name, level, None, lambda b=block: block_as_identity(b)))
            elif level in OUTER_LEVELS:
                for k in kernels:
                    if k != block.attn.kernel_size:  # its own kernel is the baseline
                        switch = lambda b=block, k=k: outer_kernel(b, k)  # noqa: E731
                        variants.append((test, name, level, k, switch))
    return variants


@torch.no_grad()
def destructive_test(
    pipeline,
    tests: Sequence[str] = TESTS,
    kernels: Sequence[int] = (5, 3),
    num_images: int = 8,
    num_inference_steps: int = 25,
    guidance_scale: float = 1.0,
    seed: int = 0,
    progress: bool = True,
) -> DestructiveResult:
    """Sample a baseline of ``num_images`` (classes cycled for class-conditional models) with
    ``seed``, then re-sample with the same seed once per variant: RoPE off in each block,
    each block as identity, each outer block with each kernel of ``kernels`` (other than its
    own). Appendix M uses 50 DDIM steps and cfg 4."""
    tests = _check_tests(tests)
    kernels = [check_kernel_size(k) for k in kernels]
    model = pipeline.transformer
    require_block_levels(model, "Destructive testing")
    labels = sampling_labels(pipeline, num_images, analysis="Destructive testing")

    def sample() -> torch.Tensor:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        images = pipeline(
            **labels,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generator,
            output_type="pt",
        ).images
        return images.float().cpu()

    baseline = sample()
    repeat = sample()
    images = {"baseline": baseline}
    results = []
    variants = _variants(model, tests, kernels)
    for test, name, level, kernel, switch in tqdm(
        variants, desc="destructive", disable=not progress
    ):
        with switch():
            variant_images = sample()
        results.append(Variant(test, name, level, kernel, *image_deltas(variant_images, baseline)))
        images[(test, results[-1].label)] = variant_images
    outer = {
        name: block.attn.kernel_size
        for name, level, block in _named_blocks(model)
        if level in OUTER_LEVELS
    }
    return DestructiveResult(
        num_images=num_images,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        seed=seed,
        class_labels=labels.get("class_labels"),
        baseline_kernels=outer,
        baseline_repeat_max_abs_delta=float((repeat - baseline).abs().max()),
        variants=results,
        images=images,
    )


# -- figures --------------------------------------------------------------------------------


def _tile(images: torch.Tensor) -> np.ndarray:
    """``(B, C, H, W)`` in ``[0, 1]`` as one ``(H, B * W, 3)`` row, 1-pixel white gaps."""
    images = images.clamp(0, 1)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    images = images[:, :3]
    padded = torch.nn.functional.pad(images, (0, 1, 0, 0), value=1.0)
    return padded.permute(2, 0, 3, 1).flatten(1, 2)[:, :-1].numpy()


TITLES = {
    "rope": "RoPE disabled per block (figure 89)",
    "identity": "Block replaced by the identity h = x (figure 90)",
    "kernel": "Outer neighborhood kernel reduced (figure 91)",
}


def plot_destructive(result: DestructiveResult, images: Mapping, output_dir: str) -> list[str]:
    """One PNG per test, ``destructive_<test>.png``: the baseline row, then one row per variant
    with its samples (left) and ``variant - baseline`` (right; grey = no change, amplified by
    the same gain for every row of the figure), labelled with the block (and kernel) and the
    mean absolute delta. ``images`` is :attr:`DestructiveResult.images`."""
    plt = pyplot()
    baseline = images["baseline"]
    paths = []
    for test in TESTS:
        variants = result.of_test(test)
        if not variants:
            continue
        largest = max(v.max_abs_delta for v in variants)
        gain = 0.5 / largest if largest > 0 else 1.0
        rows = len(variants) + 1
        batch, _, height, width = baseline.shape
        panel_width = max(3.0, 0.6 * batch)
        panel_height = max(0.5, panel_width * height / (batch * (width + 1)))
        figure, axes = plt.subplots(
            rows,
            2,
            figsize=(2 * panel_width + 2.5, rows * (panel_height + 0.15) + 0.8),
            squeeze=False,
            constrained_layout=True,
        )
        entries = [("baseline", None, baseline)] + [
            (v.label, v, images[(test, v.label)]) for v in variants
        ]
        for row, (label, variant, samples) in enumerate(entries):
            delta = 0.5 + gain * (samples - baseline)
            for ax, picture in zip(axes[row], (_tile(samples), _tile(delta)), strict=True):
                ax.imshow(picture, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
            axes[row, 0].set_ylabel(label, rotation=0, ha="right", va="center", color="red")
            if variant is not None:
                axes[row, 1].set_ylabel(
                    f"{variant.mean_abs_delta:.4f}", rotation=0, ha="right", va="center"
                )
        axes[0, 0].set_title("samples", fontsize=9)
        axes[0, 1].set_title(
            f"variant - baseline (x{2 * gain:.3g}, grey = 0), mean |delta| left", fontsize=9
        )
        figure.suptitle(
            f"{TITLES[test]}; {result.num_inference_steps} steps, cfg {result.guidance_scale:g}"
        )
        paths.append(save_figure(figure, os.path.join(output_dir, f"destructive_{test}.png")))
    return paths


# -- command line ---------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tests", default=",".join(TESTS), help=f"comma list of {', '.join(TESTS)}"
    )
    parser.add_argument(
        "--kernels", default="5,3", help="comma list of outer kernels to try (odd ints)"
    )
    add_sampling_arguments(parser, num_images=8)


def _comma_list(text: str, kind=str) -> list:
    try:
        return [kind(item.strip()) for item in text.split(",") if item.strip()]
    except ValueError as error:
        raise ValueError(f"Could not read the comma list {text!r}: {error}") from error


def run_cli(loaded, args: argparse.Namespace) -> dict:
    pipeline = loaded.require_pipeline("destructive")
    result = destructive_test(
        pipeline,
        tests=_comma_list(args.tests),
        kernels=_comma_list(args.kernels, int),
        num_images=args.num_images,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
    )
    paths = plot_destructive(result, result.images, args.output_dir)
    print(f"destructive: wrote {', '.join(paths)}")
    print(f"  baseline repeated: max |delta| {result.baseline_repeat_max_abs_delta:.3g}")
    print(f"  {'test':>8} {'variant':>16} {'mean |delta|':>13} {'max |delta|':>12} {'PSNR dB':>8}")
    for v in result.variants:
        print(
            f"  {v.test:>8} {v.label:>16} {v.mean_abs_delta:13.4f} {v.max_abs_delta:12.4f} "
            f"{v.psnr:8.2f}"
        )
    numbers = {name: getattr(result, name) for name in DestructiveResult.__dataclass_fields__}
    numbers.pop("images")
    return {**numbers, "png": paths}
