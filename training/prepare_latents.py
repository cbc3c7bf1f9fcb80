"""Encode a dataset into latent shards for ``train_mdit.py --train_shards``.

Images (an imagefolder or a datasets name, class labels kept) are stored as VAE latents with
the latent of the horizontally flipped image; a CC3M-style WebDataset (``--webdataset_urls``,
jpg + txt) is stored with T5 text states truncated to ``--max_sequence_length`` tokens and no
flips. Every sample also records its auxiliary ``image_scale`` / ``aspect_ratio`` (MDiT G.4).
Thin wiring of :mod:`diffusers_mdit.training.shards`; see its docstring for the format.

    python training/prepare_latents.py --train_data_dir imagenet/train --resolution 256 \\
        --pretrained_vae_model_name_or_path stabilityai/sd-vae-ft-ema --output_dir latents/in256
"""

from __future__ import annotations

import argparse

import torch

from diffusers_mdit.data import ImageDataset
from diffusers_mdit.data.shards import (
    LatentShardWriter,
    caption_batches,
    image_batches,
    write_latent_shards,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--pretrained_vae_model_name_or_path", default="stabilityai/sd-vae-ft-ema")
    add("--dataset_name", default=None, help="A datasets name (images, optional labels).")
    add("--train_data_dir", default=None, help="An imagefolder (class sub-folders = labels).")
    add("--image_column", default="image")
    add("--label_column", default="label")
    add("--webdataset_urls", default=None,
        help="CC3M-style WebDataset shards (jpg + txt), brace notation: "
             "'cc3m/{00000..00331}.tar'. Stores text states, no flips.")  # fmt: skip
    add("--text_encoder_name_or_path", default="google/flan-t5-large")
    add("--max_sequence_length", type=int, default=16, help="Text tokens kept (16 in the paper).")
    add("--resolution", type=int, default=256)
    add("--output_dir", required=True, help="A new or empty folder for the shards.")
    add("--shard_size", type=int, default=5000, help="Samples per shard.")
    add("--batch_size", type=int, default=64)
    add("--dataloader_num_workers", type=int, default=4)
    add("--max_train_samples", type=int, default=None, help="Stop after this many samples.")
    add("--latent_dtype", choices=["float16", "float32"], default="float16")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    sources = [args.dataset_name, args.train_data_dir, args.webdataset_urls]
    if sum(source is not None for source in sources) != 1:
        parser.error("Give exactly one of --dataset_name, --train_data_dir, --webdataset_urls.")
    return args


def main(argv: list[str] | None = None) -> dict:
    from diffusers import AutoencoderKL

    args = parse_args(argv)
    captions = args.webdataset_urls is not None
    if captions:
        batches = caption_batches(
            args.webdataset_urls, args.resolution, args.batch_size, args.dataloader_num_workers
        )
        num_classes, class_names, total = 0, None, None
    else:
        dataset = ImageDataset(
            dataset_name=args.dataset_name,
            train_data_dir=args.train_data_dir,
            resolution=args.resolution,
            image_column=args.image_column,
            label_column=args.label_column,
        )
        feature = dataset.data.features.get(args.label_column)
        class_names = getattr(feature, "names", None)
        num_classes = len(class_names) if class_names else max(dataset.labels or [-1]) + 1
        batches = image_batches(dataset, args.batch_size, args.dataloader_num_workers)
        total = len(dataset)
    vae = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path)
    vae = vae.to(args.device).eval()
    text_encoder = tokenizer = None
    if captions:
        from transformers import AutoTokenizer, T5EncoderModel

        path = args.text_encoder_name_or_path
        text_encoder = T5EncoderModel.from_pretrained(path).to(args.device).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
    metadata = {
        "source": args.webdataset_urls or args.train_data_dir or args.dataset_name,
        "resolution": args.resolution,
        "vae": args.pretrained_vae_model_name_or_path,
        "scaling_factor": vae.config.scaling_factor,
        "shift_factor": getattr(vae.config, "shift_factor", None),
        "num_classes": num_classes,
        "class_names": class_names,
        "text_encoder": args.text_encoder_name_or_path if captions else None,
        "max_sequence_length": args.max_sequence_length if captions else None,
        "aux_conditions": "image_scale = min(1, shorter side / resolution); "
        "aspect_ratio = width / height of the original image",
    }
    writer = LatentShardWriter(args.output_dir, metadata, args.shard_size, args.latent_dtype)
    write_latent_shards(
        batches,
        writer,
        vae,
        flips=not captions,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        max_sequence_length=args.max_sequence_length,
        max_samples=args.max_train_samples,
        total=total,
    )
    metadata = writer.close()
    print(f"Wrote {metadata['num_samples']} samples in {len(metadata['shards'])} shards to "
          f"{args.output_dir}")  # fmt: skip
    return metadata


if __name__ == "__main__":
    main()
