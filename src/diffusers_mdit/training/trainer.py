"""The training loop behind ``training/train_mdit.py`` and ``training/train_diffit.py``.

It wires the library pieces: a dataset (:mod:`.data`), a model from a preset or a config JSON,
an objective with its regularisers (:mod:`.objectives`, :mod:`.losses`), accelerate for devices,
mixed precision and distribution, diffusers' ``EMAModel``, and atomic checkpoints with exact
resumption (:mod:`.checkpointing`). With ``--train_shards`` it trains on precomputed latents
(:mod:`.shards`): class-conditional, with auxiliary scale/aspect conditions, or text-to-image,
and saves the pipeline with the shards' VAE (and text encoder).

Exact resumption: batches, noise, timesteps, dropout and latent flips of a step come from a
generator seeded with (seed, step, process) and indices that are a function of the step, so
nothing depends on state other than the checkpointed model, EMA, optimizer and LR schedule. On
CPU a run killed at any step and resumed ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import shutil
import signal
import sys
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ..models import (
    DiffiTTransformer2DModel,
    DiffiTUNet2DModel,
    MDiTTransformer2DModel,
    from_preset,
)
from ..models.presets import PRESET_OWNERS
from ..pipelines import DiffiTPipeline, MDiTPipeline, MDiTTextToImagePipeline
from .checkpointing import (
    batch_indices,
    check_disk_space,
    check_resume_settings,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    set_learning_rate,
    step_generator,
)
from .data import (
    DIGITS_CLASSES,
    DIGITS_IMAGES,
    DigitsDataset,
    ImageDataset,
    digits_split,
    subset_indices,
)
from .finetuning import FINETUNE_MODES, load_pretrained_model, prepare_finetuning
from .loader import training_loader
from .losses import ActivationCapture, scheduled_weight, training_losses
from .objectives import drop_aux_conditions, drop_labels, drop_text_conditions, make_objective
from .shards import LatentShardDataset

# The pipeline that samples each model family (saved at the end of training).
PIPELINES = {
    MDiTTransformer2DModel: MDiTPipeline,
    DiffiTTransformer2DModel: DiffiTPipeline,
    DiffiTUNet2DModel: DiffiTPipeline,
}


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The command-line flags (diffusers examples' names where one exists)."""
    add = parser.add_argument
    add("--output_dir", default="outputs/mdit", help="Checkpoints, samples, final pipeline.")
    add("--seed", type=int, default=0)
    add("--preset", default="MDiT-S", help="A from_preset name (see list_presets()).")
    add(
        "--model_config",
        default=None,
        help="A model config JSON instead of --preset (a config.json of a saved model: its "
        "_class_name picks the model class, MDiT when absent).",
    )
    add("--dataset_name", default="digits", help="'digits' (built in) or a datasets name.")
    add("--train_data_dir", default=None, help="An imagefolder directory (overrides name).")
    add("--image_column", default="image")
    add("--label_column", default="label")
    add(
        "--max_train_samples",
        type=int,
        default=None,
        help="Train on the first N samples only (the digits: of the training part left by "
        "--held_out_fraction, in dataset order; other image datasets: the first N rows). A "
        "subset smaller than the global batch is repeated whole to fill it.",
    )
    add(
        "--held_out_fraction",
        type=float,
        default=0.0,
        help="Digits only: never train on a held-out split, this fraction of every class, "
        "drawn with seed 0 (training.data.digits_split, the MLP probe's split); 0 = none.",
    )
    add("--resolution", type=int, default=16)
    add(
        "--random_flip",
        action="store_true",
        help="Horizontal flips at random; latent shards draw the stored flipped latent.",
    )
    add(
        "--train_shards",
        default=None,
        help="Latent shards (a folder or a glob) written by training/prepare_latents.py; "
        "replaces the image dataset, the model size follows the latents (--resolution unused).",
    )
    add(
        "--pretrained_vae_model_name_or_path",
        default=None,
        help="VAE of the final pipeline and validation grids; default: the shards' VAE.",
    )
    add(
        "--text_encoder_name_or_path",
        default=None,
        help="Text encoder of the final pipeline (text shards); default: the shards' encoder.",
    )
    add("--caption_dropout", type=float, default=0.1, help="Text dropout for CFG (text shards).")
    add(
        "--use_aux_conditions",
        action="store_true",
        help="Condition an MDiT on the shards' image scale and aspect ratio (G.4, ImageNet).",
    )
    add("--aux_dropout", type=float, default=0.1, help="Scale/aspect dropout (G.4).")
    add("--unconditional", action="store_true", help="Ignore labels (num_classes=0).")
    add("--prediction_type", choices=["x0", "epsilon", "flow"], default="x0")
    add("--snr_gamma", type=float, default=5.0, help="Min-SNR gamma (x0, epsilon).")
    add("--learned_variance", action="store_true", help="epsilon: DiT's hybrid loss.")
    add("--variance_matching_weight", type=float, default=0.0)
    add("--variance_matching_stop_step", type=int, default=None)
    add("--patch_regularization_weight", type=float, default=0.0)
    add("--patch_regularization_stop_step", type=int, default=None)
    add("--label_dropout", type=float, default=0.1)
    add("--train_batch_size", type=int, default=32, help="Per process.")
    add(
        "--dataloader_num_workers",
        type=int,
        default=0,
        help="Processes that decode the data (0: the main process). Batches do not depend on it.",
    )
    add("--gradient_accumulation_steps", type=int, default=1)
    add("--max_train_steps", type=int, default=1000)
    add("--learning_rate", type=float, default=4e-4)
    add("--lr_warmup_steps", type=int, default=0)
    add("--adam_beta1", type=float, default=0.9)
    add("--adam_beta2", type=float, default=0.95)
    add("--adam_weight_decay", type=float, default=0.01)
    add("--max_grad_norm", type=float, default=1.0)
    add("--use_ema", action="store_true")
    add("--ema_decay", type=float, default=0.9999)
    add("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    add("--gradient_checkpointing", action="store_true")
    add("--checkpointing_steps", type=int, default=500)
    add("--checkpoints_total_limit", type=int, default=3)
    add("--resume_from_checkpoint", default=None, help="A checkpoint folder or 'latest'.")
    add("--validation_steps", type=int, default=0, help="Sample grid PNG every N steps.")
    add("--num_validation_steps", type=int, default=25, help="Sampler steps for grids.")
    add(
        "--validation_prompts",
        nargs="+",
        default=None,
        help="Prompts of the text grids; default: the first 4 captions of the shards.",
    )
    add(
        "--pretrained_model_name_or_path",
        default=None,
        help="Start from a trained model: a saved pipeline folder (its transformer/) or model "
        "folder. --preset/--model_config are then unused.",
    )
    add(
        "--finetune",
        choices=FINETUNE_MODES,
        default=None,
        help="With --pretrained_model_name_or_path: train everything (full, the default), only "
        "the aggregate blocks with neighborhood core attention (aggregate, MDiT J.1), only the "
        "replicated larger core patch projections (patch, J.2), or LoRA adapters (lora).",
    )
    add("--core_kernel_size", type=int, default=15, help="--finetune aggregate: NA kernel.")
    add("--lora_rank", type=int, default=16)
    add("--lora_alpha", type=float, default=None, help="LoRA alpha; default: the rank.")
    add(
        "--lora_target_modules",
        nargs="+",
        default=None,
        help="Module names or groups to adapt; default: attention and feed-forward projections.",
    )
    add("--report_to", default="tensorboard", help="tensorboard, wandb, all or none.")
    add("--push_to_hub", action="store_true")
    add("--hub_model_id", default=None)
    return parser


@dataclass
class TrainResult:
    """What a run leaves behind. ``finished``: it reached ``--max_train_steps`` and saved the
    pipeline in ``pipeline_dir``; otherwise (SIGTERM/SIGINT) it stopped after saving
    ``checkpoint_dir`` and no pipeline was written."""

    pipeline_dir: str
    final_loss: float
    steps: int
    trainable_parameters: int = 0
    finished: bool = True
    checkpoint_dir: str | None = None


GLOBAL_BATCH = "global batch (--train_batch_size x processes)"


def run_settings(args, accelerator) -> dict:
    """The settings a checkpoint records (every flag, and the global batch), as JSON values;
    :func:`.checkpointing.check_resume_settings` compares them on resume."""
    settings = {k: v for k, v in vars(args).items()}
    settings[GLOBAL_BATCH] = args.train_batch_size * accelerator.num_processes
    return json.loads(json.dumps(settings))


def build_dataset(args, min_length: int = 1):
    """The training data and its number of classes. ``--max_train_samples`` subsets are
    repeated to at least ``min_length`` items (the global batch)."""
    digits = not args.train_shards and args.train_data_dir is None and args.dataset_name == "digits"
    if args.held_out_fraction and not digits:
        raise ValueError(
            "--held_out_fraction splits the built-in digits only; for other data, hold images "
            "out of the folder or dataset itself (or use a glob of latent shards)."
        )
    if args.train_shards:
        if args.max_train_samples is not None:
            raise ValueError(
                "--max_train_samples does not subset latent shards; pass a glob of fewer "
                "shards to --train_shards instead."
            )
        shards = LatentShardDataset(args.train_shards)
        return shards, shards.num_classes
    if digits:
        indices = None
        if args.held_out_fraction or args.max_train_samples is not None:
            kept = range(DIGITS_IMAGES)
            if args.held_out_fraction:
                kept = digits_split(args.held_out_fraction)[0].tolist()
            indices = subset_indices(kept, args.max_train_samples, min_length)
        return DigitsDataset(args.resolution, channels=3, indices=indices), DIGITS_CLASSES
    data = ImageDataset(
        dataset_name=None if args.train_data_dir else args.dataset_name,
        train_data_dir=args.train_data_dir,
        resolution=args.resolution,
        random_flip=False,  # flips are drawn per step by the loader (exact resumption)
        image_column=args.image_column,
        label_column=args.label_column,
    )
    if args.max_train_samples is not None:
        data = data.select(subset_indices(range(len(data)), args.max_train_samples, min_length))
    return data, (max(data.labels) + 1 if data.labels else 0)


def build_model(
    args,
    num_classes: int,
    channels: int,
    sample_size: int | None = None,
    cross_attention_dim: int | None = None,
):
    """The model of ``--preset`` or ``--model_config`` for this data (channels, classes,
    resolution or latent ``sample_size``, learned variance, text width, auxiliary conditions)."""
    out_channels = 2 * channels if args.learned_variance else channels
    overrides = dict(in_channels=channels, out_channels=out_channels, num_classes=num_classes)
    overrides["sample_size"] = sample_size or args.resolution
    if cross_attention_dim is not None:
        overrides["cross_attention_dim"] = cross_attention_dim
    if args.use_aux_conditions:
        overrides["use_aux_conditions"] = True
    if args.model_config:
        with open(args.model_config) as f:
            config = json.load(f)
        classes = {cls.__name__: cls for cls in PIPELINES}
        name = config.get("_class_name", MDiTTransformer2DModel.__name__)
        if name not in classes:
            raise ValueError(
                f"{args.model_config} configures {name!r}; trainable models: {sorted(classes)}."
            )
        family = classes[name]
        config = {k: v for k, v in config.items() if not k.startswith("_")}
    else:
        if args.preset not in PRESET_OWNERS:
            raise ValueError(
                f"Unknown preset {args.preset!r}; available: {', '.join(PRESET_OWNERS)}."
            )
        family = PRESET_OWNERS[args.preset]
    if family is not MDiTTransformer2DModel and (
        cross_attention_dim is not None or args.use_aux_conditions
    ):
        raise ValueError(
            f"Text and auxiliary conditions need an MDiT; {family.__name__} takes class labels "
            "only. Choose an MDiT preset or config."
        )
    if args.model_config:
        model = family.from_config({**config, **overrides})
    else:
        model = from_preset(args.preset, **overrides)
    size = overrides["sample_size"]
    if size % model.size_multiple:
        what = f"The shards' latent size {size}" if sample_size else f"--resolution {size}"
        raise ValueError(
            f"{what} must be a multiple of {model.size_multiple} (the model's patching); "
            "choose another resolution or preset."
        )
    return model


def check_data_arguments(args, dataset) -> None:
    """Clear errors for flags that the training data cannot serve."""
    if not isinstance(dataset, LatentShardDataset):
        for flag in (
            "use_aux_conditions",
            "pretrained_vae_model_name_or_path",
            "text_encoder_name_or_path",
        ):
            if getattr(args, flag):
                raise ValueError(
                    f"--{flag} needs --train_shards (latent shards from "
                    "training/prepare_latents.py); pixel datasets have no VAE, text or "
                    "auxiliary values."
                )
    elif args.random_flip and not dataset.has_flips:
        raise ValueError(
            f"--random_flip: the shards in {dataset.folder!r} store no flipped latents (caption "
            "shards never do); drop the flag."
        )


def finetuning_model(
    args, accelerator, num_classes, channels, sample_size, cross_attention_dim=None
):
    """The ``--pretrained_model_name_or_path`` model set up for ``--finetune``, checked
    against what the training data needs."""
    if not args.pretrained_model_name_or_path:
        raise ValueError(
            f"--finetune {args.finetune} needs --pretrained_model_name_or_path (a saved "
            "pipeline or model folder)."
        )
    if args.finetune == "lora" and args.push_to_hub:
        raise ValueError(
            "--push_to_hub is not supported with --finetune lora yet: upload the output "
            "folder's pytorch_lora_weights.safetensors with `huggingface-cli upload`."
        )
    pretrained = load_pretrained_model(args.pretrained_model_name_or_path)
    needs = dict(
        in_channels=channels, num_classes=num_classes, cross_attention_dim=cross_attention_dim
    )
    for key, need in needs.items():
        have = getattr(pretrained.config, key, None)
        if (have or None) != (need or None):
            raise ValueError(
                f"The pretrained model has {key}={have} but the training data needs {need}; "
                "fine-tune on data like the model's (same channels, classes and text encoder)."
            )
    summary = prepare_finetuning(
        pretrained,
        args.finetune or "full",
        kernel_size=args.core_kernel_size,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_targets=args.lora_target_modules,
    )
    if sample_size % pretrained.size_multiple:
        raise ValueError(
            f"Size {sample_size} must be a multiple of {pretrained.size_multiple} (the "
            "fine-tuned model's patching); choose another --resolution."
        )
    pretrained.register_to_config(sample_size=sample_size)
    accelerator.print(f"{summary} (from {args.pretrained_model_name_or_path})")
    return pretrained


def sampling_scheduler(objective):
    """The scheduler a model trained with ``objective`` is sampled with (saved with it)."""
    config = objective.noise_scheduler.config
    if isinstance(objective.noise_scheduler, DDPMScheduler) and config.prediction_type == "sample":
        return DDIMScheduler.from_config(
            config, prediction_type="sample", clip_sample=False, timestep_spacing="trailing"
        )
    return objective.noise_scheduler.__class__.from_config(config)


def save_grid(images: torch.Tensor, rows: int, path: str, padding: int = 2) -> None:
    """``(N, C, H, W)`` images in [0, 1] as a PNG grid with ``rows`` rows, the images
    separated by ``padding`` grey pixels."""
    import numpy as np
    import PIL.Image

    n, c, h, w = images.shape
    cols = math.ceil(n / rows)
    grid = torch.full((c, rows * (h + padding) + padding, cols * (w + padding) + padding), 0.5)
    for i, image in enumerate(images.clamp(0, 1).cpu()):
        r, k = divmod(i, cols)
        top, left = padding + r * (h + padding), padding + k * (w + padding)
        grid[:, top : top + h, left : left + w] = image
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    PIL.Image.fromarray(array.squeeze(-1) if c == 1 else array).save(path)


def sample_grid(
    pipe, num_classes: int, per_class: int, steps: int, seed: int, prompts=None
) -> torch.Tensor:
    """``per_class`` samples of every class (rows = classes) or of every prompt (rows =
    prompts), or ``per_class`` x 10 unconditional ones, as ``(N, C, H, W)`` in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    if prompts:
        return pipe(prompt=list(prompts), num_images_per_prompt=per_class, generator=generator,
                    num_inference_steps=steps, output_type="pt").images  # fmt: skip
    if num_classes:
        labels = [c for c in range(num_classes) for _ in range(per_class)]
        return pipe(class_labels=labels, num_inference_steps=steps, generator=generator,
                    output_type="pt").images  # fmt: skip
    return pipe(batch_size=10 * per_class, num_inference_steps=steps, generator=generator,
                output_type="pt").images  # fmt: skip


def train(args) -> TrainResult:
    """Run (or resume) training as configured by ``args`` (see :func:`add_arguments`)."""
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "logs")
        ),
    )
    set_seed(args.seed)
    dataset, num_classes = build_dataset(args, args.train_batch_size * accelerator.num_processes)
    num_classes = 0 if args.unconditional else num_classes
    check_data_arguments(args, dataset)
    shards = isinstance(dataset, LatentShardDataset)
    if shards:
        channels, _, sample_size = dataset.latent_shape
        needs = (num_classes, channels, sample_size, dataset.text_embedding_dim)
    else:
        channels = dataset[0]["pixel_values"].shape[0]
        needs = (num_classes, channels, args.resolution, None)
    if args.pretrained_model_name_or_path or args.finetune:
        model = finetuning_model(args, accelerator, *needs)
    else:
        model = build_model(args, *needs)
    use_text = shards and dataset.has_text
    if getattr(model.config, "cross_attention_dim", None) is not None and not use_text:
        raise ValueError(
            f"The model is a text model (cross_attention_dim={model.config.cross_attention_dim}) "
            "but the training data has no text embeddings: prepare caption shards with "
            "training/prepare_latents.py --webdataset_urls ... and pass --train_shards, or drop "
            "cross_attention_dim from the model config."
        )
    use_aux = shards and getattr(model.config, "use_aux_conditions", False)
    # The pipeline's other components, for validation grids and the final pipeline.
    components, prompts = {}, None
    if shards and accelerator.is_main_process:
        components["vae"] = dataset.load_vae(args.pretrained_vae_model_name_or_path)
        if use_text:
            encoder, tokenizer = dataset.load_text_encoder(args.text_encoder_name_or_path)
            components.update(text_encoder=encoder, tokenizer=tokenizer)
            prompts = args.validation_prompts or [
                dataset.caption(i) for i in range(min(4, len(dataset)))
            ]
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    kwargs = {} if args.prediction_type == "flow" else {"snr_gamma": args.snr_gamma}
    if args.prediction_type == "epsilon":
        kwargs["learned_variance"] = args.learned_variance
    objective = make_objective(args.prediction_type, **kwargs)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
    )
    lr_scheduler = get_scheduler(
        "constant_with_warmup", optimizer, num_warmup_steps=args.lr_warmup_steps
    )
    ema = None
    if args.use_ema:
        ema = EMAModel(
            trainable,
            decay=args.ema_decay,
            model_cls=type(model),
            model_config=model.config,
        )
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    checkpointed = dict(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler)
    if ema is not None:
        ema.to(accelerator.device)
        checkpointed["ema"] = ema
    unwrapped = accelerator.unwrap_model(model)
    settings = run_settings(args, accelerator)

    start = 0
    resume = resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if resume is not None:
        state = load_checkpoint(accelerator, resume, checkpointed)
        start = state["step"]
        changes = check_resume_settings(state.get("settings"), settings, resume)
        if "learning_rate" in changes:
            set_learning_rate(optimizer, lr_scheduler, args.learning_rate)
        for key, (old, new) in changes.items():
            accelerator.print(f"Resuming with --{key} {new!r} (the checkpoint's run had {old!r}).")
        accelerator.print(f"Resumed from {resume} at step {start}.")
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        accelerator.init_trackers("mdit", config={k: str(v) for k, v in vars(args).items()})

    def request_stop(signum, frame):
        # accelerate's trigger is all-reduced by check_trigger(): every process stops after the
        # same step, even when only some of them received the signal.
        accelerator.set_trigger()

    previous_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    global_batch = args.train_batch_size * accelerator.num_processes
    micro_batches = args.gradient_accumulation_steps
    progress = tqdm(
        total=args.max_train_steps,
        initial=start,
        disable=not accelerator.is_local_main_process,
        desc="training",
    )
    if args.patch_regularization_weight and not hasattr(unwrapped, "core_unpatch"):
        raise ValueError(
            "--patch_regularization_weight needs an MDiT (it regularises the core un-patch "
            f"output); {type(unwrapped).__name__} has none."
        )
    capture = None
    if args.patch_regularization_weight:
        capture = ActivationCapture(unwrapped.core_unpatch)
    step, loss_value, checkpoint = start, float("nan"), resume
    share = slice(
        accelerator.process_index * args.train_batch_size,
        (accelerator.process_index + 1) * args.train_batch_size,
    )
    pin = accelerator.device.type == "cuda"
    loader = training_loader(
        dataset, global_batch, args.seed, start * micro_batches,
        args.max_train_steps * micro_batches, share, args.random_flip,
        num_workers=args.dataloader_num_workers, pin_memory=pin,
    )  # fmt: skip
    batches = iter(loader)
    try:
        while step < args.max_train_steps and not accelerator.check_trigger():
            for micro in range(micro_batches):
                index = step * micro_batches + micro
                # Draws are made for the global batch and sliced: one process with the
                # same global batch sees exactly what all processes together see.
                generator = step_generator(args.seed, index)
                ids = batch_indices(len(dataset), global_batch, index, args.seed)
                batch = next(batches)
                if batch["index"].tolist() != ids[share]:
                    raise RuntimeError("The data loader is out of step with the training loop.")
                key = "latents" if shards else "pixel_values"
                x0 = batch[key].to(accelerator.device, non_blocking=pin)
                noisy = objective.prepare(x0, generator, share, global_batch)
                labels = None
                if num_classes:
                    labels = torch.tensor([dataset.label(i) for i in ids])
                    labels = drop_labels(labels, num_classes, args.label_dropout, generator)
                    labels = labels[share].to(accelerator.device)
                conditions = {}
                if use_aux:
                    scale, aspect = drop_aux_conditions(
                        *dataset.aux_conditions(ids), args.aux_dropout, generator
                    )
                    conditions["image_scale"] = scale[share].to(accelerator.device)
                    conditions["aspect_ratio"] = aspect[share].to(accelerator.device)
                if use_text:
                    states, mask = drop_text_conditions(
                        batch["encoder_hidden_states"], batch["encoder_attention_mask"],
                        args.caption_dropout, generator, share, global_batch,
                    )  # fmt: skip
                    conditions["encoder_hidden_states"] = states.to(accelerator.device)
                    conditions["encoder_attention_mask"] = mask.to(accelerator.device)
                with accelerator.accumulate(model):
                    output = model(
                        noisy.noisy, noisy.model_timesteps.to(accelerator.device),
                        class_labels=labels, **conditions,
                    ).sample  # fmt: skip
                    activation = capture.take() if capture is not None else None
                    patch_weight = scheduled_weight(
                        args.patch_regularization_weight, step, args.patch_regularization_stop_step
                    )
                    losses = training_losses(
                        objective,
                        output,
                        noisy,
                        variance_matching_weight=scheduled_weight(
                            args.variance_matching_weight, step, args.variance_matching_stop_step
                        ),
                        patch_activation=activation if patch_weight else None,
                        patch_weight=patch_weight,
                    )
                    loss = losses["loss"]
                    if not torch.isfinite(loss):
                        raise NonFiniteLossError(
                            f"Non-finite loss ({loss.item()}) at step {step}. The last good "
                            f"checkpoint in {args.output_dir} is kept; lower the learning rate "
                            "or use --mixed_precision no, then --resume_from_checkpoint latest."
                        )
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and args.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.step(trainable)
            step += 1
            loss_value = accelerator.gather(loss.detach()[None]).mean().item()
            progress.update(1)
            progress.set_postfix(loss=f"{loss_value:.4f}")
            accelerator.log({k: v.item() for k, v in losses.items()}, step=step)
            if args.checkpointing_steps and step % args.checkpointing_steps == 0:
                checkpoint = save_checkpoint(
                    accelerator, args.output_dir, step, checkpointed, {"settings": settings},
                    total_limit=args.checkpoints_total_limit,
                )  # fmt: skip
            if args.validation_steps and step % args.validation_steps == 0:
                validate(
                    args, accelerator, unwrapped, ema, objective, num_classes, step,
                    components, prompts,
                )  # fmt: skip
        if step < args.max_train_steps or step % max(args.checkpointing_steps, 1):
            checkpoint = save_checkpoint(
                accelerator, args.output_dir, step, checkpointed, {"settings": settings},
                total_limit=args.checkpoints_total_limit,
            )  # fmt: skip
    finally:
        if capture is not None:
            capture.remove()
        progress.close()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)

    pipeline_dir = args.output_dir
    if step >= args.max_train_steps and accelerator.is_main_process:
        pipe = final_pipeline(unwrapped, ema, objective, **components)
        save_final(pipe, pipeline_dir, lora=args.finetune == "lora")
        if args.push_to_hub:
            pipe.push_to_hub(
                args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)),
                training_data=args.train_shards or args.train_data_dir or args.dataset_name,
                training_steps=step,
                existing_model_card="keep",  # an existing README is the user's: never replaced
            )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(
        pipeline_dir=pipeline_dir,
        final_loss=loss_value,
        steps=step,
        trainable_parameters=sum(p.numel() for p in trainable),
        finished=step >= args.max_train_steps,
        checkpoint_dir=checkpoint,
    )


def save_final(pipe, output_dir: str, lora: bool = False) -> None:
    """Save the trained pipeline (or, for LoRA, the adapter only) into ``output_dir`` so that
    a failure never leaves a partial one: the free space is checked first, the files are
    written into ``output_dir/pipeline.tmp`` and moved into place, ``model_index.json`` last
    (a folder is a pipeline only once it has one)."""
    tensors = [t for c in pipe.components.values() if isinstance(c, torch.nn.Module)
               for t in c.state_dict().values()]  # fmt: skip
    os.makedirs(output_dir, exist_ok=True)
    check_disk_space(output_dir, sum(t.numel() * t.element_size() for t in tensors), "the pipeline")
    partial = os.path.join(output_dir, "pipeline.tmp")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        if lora:
            # diffusers' LoRA convention: the adapter only, loaded onto the base pipeline with
            # pipe.load_lora_weights(output_dir); rank, alpha and targets in its metadata.
            from ..lora import get_lora_metadata, get_lora_state_dict

            type(pipe).save_lora_weights(
                partial,
                transformer_lora_layers=get_lora_state_dict(pipe.transformer),
                transformer_lora_adapter_metadata=get_lora_metadata(pipe.transformer),
            )
        else:
            pipe.save_pretrained(partial)
    except OSError as error:
        shutil.rmtree(partial, ignore_errors=True)
        raise OSError(
            f"Could not save the pipeline in {output_dir} ({error.strerror or error}); the "
            "partial files were removed and the checkpoints are kept. Fix the cause and run "
            "again with --resume_from_checkpoint latest to save it."
        ) from error
    names = sorted(os.listdir(partial), key=lambda name: name == "model_index.json")
    for name in names:
        target = os.path.join(output_dir, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(os.path.join(partial, name), target)
    os.rmdir(partial)


def follow_launcher_signals() -> None:
    """Receive SIGTERM when the ``accelerate launch`` process that started us dies.

    accelerate's single-process launcher runs the script as a child and does not pass SIGTERM
    on: a scheduler's SIGTERM kills the launcher (exit 143) and leaves the trainer running,
    unaware, until it is SIGKILLed. On Linux we ask the kernel (``prctl(PR_SET_PDEATHSIG)``) to
    send this process SIGTERM when its launcher dies, so it saves a checkpoint and exits 0.
    Only under accelerate's launcher: a run started from a shell keeps running when the shell
    exits (``nohup``). torchrun (``accelerate launch --multi_gpu``) forwards SIGTERM itself.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        with open(f"/proc/{parent}/cmdline", "rb") as f:
            if b"accelerate" not in f.read():
                return
    except OSError:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the launcher died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def main(description: str, **defaults) -> None:
    """The command line of ``training/train_mdit.py`` and ``train_diffit.py``: parse the
    flags (``defaults`` override add_arguments' defaults), train, say what was written. User
    errors (bad flags, data, checkpoints) print ``error: ...`` and exit 2, not a traceback."""
    parser = add_arguments(argparse.ArgumentParser(description=description))
    parser.set_defaults(**defaults)
    args = parser.parse_args()
    follow_launcher_signals()
    try:
        result = train(args)
    except (ValueError, OSError) as error:
        parser.exit(2, f"error: {error}\n")
    if result.finished:
        print(f"Finished at step {result.steps}, loss {result.final_loss:.6f}; pipeline in "
              f"{result.pipeline_dir}")  # fmt: skip
    else:
        print(f"Stopped at step {result.steps} (signal), loss {result.final_loss:.6f}; "
              f"checkpoint in {result.checkpoint_dir}; no pipeline was saved. Continue with "
              "--resume_from_checkpoint latest.")  # fmt: skip


def final_pipeline(model, ema, objective, vae=None, text_encoder=None, tokenizer=None):
    """A pipeline with the trained weights (the EMA's when kept), the matching scheduler and,
    for latent models, the VAE; a text encoder makes it an ``MDiTTextToImagePipeline``."""
    transformer = type(model).from_config(model.config)
    for name, config in (getattr(model, "peft_config", None) or {}).items():
        transformer.add_adapter(config, adapter_name=name)  # LoRA: the same adapters
    transformer.load_state_dict(model.state_dict())
    if ema is not None:  # the EMA holds the trained parameters only (all, unless fine-tuning)
        trained = {name for name, p in model.named_parameters() if p.requires_grad}
        ema.copy_to([p for name, p in transformer.named_parameters() if name in trained])
    transformer.requires_grad_(False)
    scheduler = sampling_scheduler(objective)
    if text_encoder is not None:
        return MDiTTextToImagePipeline(
            transformer=transformer.eval(),
            scheduler=scheduler,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            vae=vae,
        )
    pipeline = PIPELINES[type(model)]
    return pipeline(transformer=transformer.eval(), scheduler=scheduler, vae=vae)


@torch.no_grad()
def validate(
    args, accelerator, model, ema, objective, num_classes, step, components=None, prompts=None
) -> None:
    """A sample grid (one row per class or prompt) as ``samples/step-<step>.png``."""
    if not accelerator.is_main_process:
        return
    pipe = final_pipeline(model, ema, objective, **(components or {})).to(accelerator.device)
    images = sample_grid(pipe, num_classes, 8, args.num_validation_steps, args.seed, prompts)
    folder = os.path.join(args.output_dir, "samples")
    os.makedirs(folder, exist_ok=True)
    rows = len(prompts) if prompts else num_classes or 10
    save_grid(images, rows, os.path.join(folder, f"step-{step:06d}.png"))
