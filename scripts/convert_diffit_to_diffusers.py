"""Convert an official NVIDIA DiffiT checkpoint (``diffit_256.safetensors`` /
``diffit_512.safetensors`` of the Hub repository ``nvidia/DiffiT``) into a ``DiffiTPipeline``
folder: the transformer (``DiffiTTransformer2DModel.from_single_file``), the authors' scheduler,
the VAE, and a model card with the weights' license, the paper's FIDs and the sampling call.

    python scripts/convert_diffit_to_diffusers.py \\
        --checkpoint_path nvidia/DiffiT/diffit_256.safetensors --image_size 256 \\
        --output_dir diffit-256

The folder loads with ``DiffiTPipeline.from_pretrained`` and with
``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffusers import AutoencoderKL

from diffusers_mdit import DiffiTPipeline, DiffiTTransformer2DModel
from diffusers_mdit.hub import create_model_card
from diffusers_mdit.models.conversion_diffit import (
    OFFICIAL_FID,
    OFFICIAL_SAMPLING,
    OFFICIAL_VAE,
    OFFICIAL_VAE_SCALING_FACTOR,
    official_diffit_scheduler,
    official_image_size,
)

LICENSE = "cc-by-nc-sa-4.0"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint_path",
        required=True,
        help="Official checkpoint: local file, Hub URL or <owner>/<repo>/<file>.",
    )
    parser.add_argument(
        "--image_size",
        type=int,
        choices=(256, 512),
        help="Image size of the checkpoint (checked against its latent size; inferred if omitted).",
    )
    parser.add_argument("--vae_model_name_or_path", default=OFFICIAL_VAE)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--push_to_hub", action="store_true")
    parser.add_argument("--hub_model_id", help="Repository to push to (with --push_to_hub).")
    args = parser.parse_args(argv)
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id.")
    return args


def sampling_call(source: str, settings: dict) -> str:
    """The Python call that samples as the authors do."""
    arguments = "".join(f"    {key}={value!r},\n" for key, value in settings.items())
    return (
        "import torch\n"
        "from diffusers_mdit import DiffiTPipeline\n\n"
        f'pipe = DiffiTPipeline.from_pretrained("{source}")\n'
        "images = pipe(\n"
        "    class_labels=[207, 360, 387, 974],\n"
        f"{arguments}"
        "    generator=torch.Generator().manual_seed(0),\n"
        ").images\n"
    )


def card_text(image_size: int, source: str, checkpoint: str, vae: str, settings: dict) -> str:
    return f"""## Official DiffiT weights

Converted from NVIDIA's `{checkpoint}` (Hub `nvidia/DiffiT`; code GitHub NVlabs/DiffiT) by
diffusers-mdit's `scripts/convert_diffit_to_diffusers.py`. The weights are NVIDIA's, under
CC-BY-NC-SA-4.0 (non-commercial). Paper: Hatamizadeh et al., "DiffiT: Diffusion Vision
Transformers for Image Generation" (arXiv 2312.02139); reported on ImageNet-{image_size}:
{OFFICIAL_FID[image_size]}.

Sampling as the authors do (their `sample.py`): 250 respaced ancestral DDPM steps (linear betas
1e-4..0.02, learned-range variance, in this folder's scheduler config), classifier-free guidance
on the first 3 latent channels ({_guidance_words(settings)}), VAE `{vae}` (theirs:
`{OFFICIAL_VAE}`) with scaling {OFFICIAL_VAE_SCALING_FACTOR}, float32:

```python
{sampling_call(source, settings)}```

"""


def _guidance_words(settings: dict) -> str:
    if settings["guidance_schedule"] == "power-cosine":
        return (
            f"scale {settings['guidance_scale']} ramped by the power-cosine schedule "
            f"1 + (s-1)(1-cos(pi (1-t/1000)^{settings['guidance_power']:g}))/2 of the timestep t"
        )
    return f"constant scale {settings['guidance_scale']}"


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    transformer = DiffiTTransformer2DModel.from_single_file(args.checkpoint_path)
    vae = AutoencoderKL.from_pretrained(args.vae_model_name_or_path, use_safetensors=True)
    if vae.config.scaling_factor != OFFICIAL_VAE_SCALING_FACTOR:
        raise ValueError(
            f"{args.vae_model_name_or_path} has scaling_factor {vae.config.scaling_factor}; the "
            f"official sampling decodes with {OFFICIAL_VAE_SCALING_FACTOR} (sd-vae-ft-ema)."
        )
    image_size = official_image_size(transformer.config.sample_size)
    latent_size = transformer.config.sample_size
    if args.image_size is not None and args.image_size // 8 != latent_size:
        raise ValueError(
            f"--image_size {args.image_size} needs {args.image_size // 8}x{args.image_size // 8} "
            f"latents; {args.checkpoint_path} has {latent_size}x{latent_size}."
        )
    settings = OFFICIAL_SAMPLING[image_size]
    pipe = DiffiTPipeline(transformer=transformer, scheduler=official_diffit_scheduler(), vae=vae)

    output_dir = Path(args.output_dir)
    pipe.save_pretrained(output_dir)
    source = args.hub_model_id or str(output_dir)
    card = create_model_card(
        pipe,
        repo_id=args.hub_model_id,
        training_data=f"ImageNet-1k (ILSVRC 2012), {image_size}x{image_size}, class-conditional",
        license=LICENSE,
        tags=["diffit", "nvidia"],
        datasets=["imagenet-1k"],
    )
    official = card_text(
        image_size, source, Path(args.checkpoint_path).name, args.vae_model_name_or_path, settings
    )
    head, citation, tail = card.text.partition("## Citation")
    card.text = head + official + citation + tail
    card.save(str(output_dir / "README.md"))
    print(f"Wrote {output_dir} (ImageNet-{image_size} settings: {settings}).")

    if args.push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        repo_id = api.create_repo(args.hub_model_id, exist_ok=True).repo_id
        api.upload_folder(repo_id=repo_id, folder_path=str(output_dir))
        print(f"Pushed to {repo_id}.")
    return output_dir


if __name__ == "__main__":
    main()
