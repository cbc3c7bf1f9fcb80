"""The training loop behind ``training/train_mdit.py`` and ``training/train_diffit.py``.

It wires the library pieces: a :class:`.config.TrainingConfig`, a dataset
(:mod:`diffusers_mdit.data`) read by the step-indexed loader (:mod:`.loader`), a model from a
preset, a config JSON or a pre-trained folder (:mod:`diffusers_mdit.families`), an objective
with its regularisers (:mod:`.objectives`, :mod:`.losses`), accelerate for devices, mixed
precision and distribution, diffusers' ``EMAModel``, and atomic pickle-free checkpoints with
exact resumption (:mod:`.checkpointing`). With ``--train_shards`` it trains on precomputed
latents: class-conditional, with auxiliary scale/aspect conditions, or text-to-image, and
saves the pipeline with the shards' VAE (and text encoder).

The parts, in order: :func:`setup` (data, model, objective, optimizer, EMA), :func:`resume`,
:func:`train_step` with :func:`model_inputs` (one global batch to the model's inputs), then
:func:`validate` and :func:`save_final`; :func:`train` runs them.

Exact resumption: batches, noise, timesteps, dropout and flips of a step come from generators
seeded with (seed, step) and indices that are a function of the step, so nothing depends on
state other than the checkpointed model, EMA, optimizer and LR schedule. On CPU a run killed at
any step and resumed ends with the same weights as an uninterrupted one, with any number of
loader workers.
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
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ..data import (
    DIGITS_CLASSES,
    DIGITS_IMAGES,
    DigitsDataset,
    ImageDataset,
    digits_split,
    subset_indices,
)
from ..data.shards import LatentShardDataset
from ..families import FAMILIES, family_of, load_model
from ..models import MDiTTransformer2DModel, from_preset
from ..models.presets import PRESET_OWNERS
from ..pipelines import MDiTTextToImagePipeline
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
from .config import TrainingConfig
from .finetuning import prepare_finetuning
from .loader import training_loader
from .losses import ActivationCapture, scheduled_weight, training_losses
from .objectives import drop_aux_conditions, drop_labels, drop_text_conditions, make_objective


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The command-line flags: one per :class:`.config.TrainingConfig` field."""
    return TrainingConfig.add_arguments(parser)


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


def run_settings(config: TrainingConfig, accelerator) -> dict:
    """The settings a checkpoint records (every field, and the global batch), as JSON values;
    :func:`.checkpointing.check_resume_settings` compares them on resume."""
    settings = config.to_dict()
    settings[GLOBAL_BATCH] = config.train_batch_size * accelerator.num_processes
    return json.loads(json.dumps(settings))


def build_dataset(config: TrainingConfig, min_length: int = 1):
    """The training data and its number of classes. ``--max_train_samples`` subsets are
    repeated to at least ``min_length`` items (the global batch)."""
    digits = (
        not config.train_shards
        and config.train_data_dir is None
        and config.dataset_name == "digits"
    )
    if config.held_out_fraction and not digits:
        raise ValueError(
            "--held_out_fraction splits the built-in digits only; for other data, hold images "
            "out of the folder or dataset itself (or use a glob of latent shards)."
        )
    if config.train_shards:
        if config.max_train_samples is not None:
            raise ValueError(
                "--max_train_samples does not subset latent shards; pass a glob of fewer "
                "shards to --train_shards instead."
            )
        shards = LatentShardDataset(config.train_shards)
        return shards, shards.num_classes
    if digits:
        indices = None
        if config.held_out_fraction or config.max_train_samples is not None:
            kept = range(DIGITS_IMAGES)
            if config.held_out_fraction:
                kept = digits_split(config.held_out_fraction)[0].tolist()
            indices = subset_indices(kept, config.max_train_samples, min_length)
        return DigitsDataset(config.resolution, channels=3, indices=indices), DIGITS_CLASSES
    data = ImageDataset(
        dataset_name=None if config.train_data_dir else config.dataset_name,
        train_data_dir=config.train_data_dir,
        resolution=config.resolution,
        random_flip=False,  # flips are drawn per step by the loader (exact resumption)
        image_column=config.image_column,
        label_column=config.label_column,
    )
    if config.max_train_samples is not None:
        data = data.select(subset_indices(range(len(data)), config.max_train_samples, min_length))
    return data, (max(data.labels) + 1 if data.labels else 0)


def build_model(
    config: TrainingConfig,
    num_classes: int,
    channels: int,
    sample_size: int | None = None,
    cross_attention_dim: int | None = None,
):
    """The model of ``--preset`` or ``--model_config`` for this data (channels, classes,
    resolution or latent ``sample_size``, learned variance, text width, auxiliary conditions)."""
    out_channels = 2 * channels if config.learned_variance else channels
    overrides = dict(in_channels=channels, out_channels=out_channels, num_classes=num_classes)
    overrides["sample_size"] = sample_size or config.resolution
    if cross_attention_dim is not None:
        overrides["cross_attention_dim"] = cross_attention_dim
    if config.use_aux_conditions:
        overrides["use_aux_conditions"] = True
    if config.model_config:
        with open(config.model_config) as f:
            saved = json.load(f)
        name = saved.get("_class_name", MDiTTransformer2DModel.__name__)
        if name not in FAMILIES:
            raise ValueError(
                f"{config.model_config} configures {name!r}; trainable models: {sorted(FAMILIES)}."
            )
        family = FAMILIES[name].model_class
        saved = {k: v for k, v in saved.items() if not k.startswith("_")}
    else:
        if config.preset not in PRESET_OWNERS:
            raise ValueError(
                f"Unknown preset {config.preset!r}; available: {', '.join(PRESET_OWNERS)}."
            )
        family = PRESET_OWNERS[config.preset]
    if family is not MDiTTransformer2DModel and (
        cross_attention_dim is not None or config.use_aux_conditions
    ):
        raise ValueError(
            f"Text and auxiliary conditions need an MDiT; {family.__name__} takes class labels "
            "only. Choose an MDiT preset or config."
        )
    if config.model_config:
        model = family.from_config({**saved, **overrides})
    else:
        model = from_preset(config.preset, **overrides)
    size = overrides["sample_size"]
    if size % model.size_multiple:
        what = f"The shards' latent size {size}" if config.train_shards else f"--resolution {size}"
        raise ValueError(
            f"{what} must be a multiple of {model.size_multiple} (the model's patching); "
            "choose another resolution or preset."
        )
    return model


def check_data_arguments(config: TrainingConfig, dataset) -> None:
    """Clear errors for flags that the training data cannot serve."""
    if not isinstance(dataset, LatentShardDataset):
        for flag in (
            "use_aux_conditions",
            "pretrained_vae_model_name_or_path",
            "text_encoder_name_or_path",
        ):
            if getattr(config, flag):
                raise ValueError(
                    f"--{flag} needs --train_shards (latent shards from "
                    "training/prepare_latents.py); pixel datasets have no VAE, text or "
                    "auxiliary values."
                )
    elif config.random_flip and not dataset.has_flips:
        raise ValueError(
            f"--random_flip: the shards in {dataset.folder!r} store no flipped latents (caption "
            "shards never do); drop the flag."
        )


def finetuning_model(
    config: TrainingConfig,
    accelerator,
    num_classes,
    channels,
    sample_size,
    cross_attention_dim=None,
):
    """The ``--pretrained_model_name_or_path`` model set up for ``--finetune``, checked
    against what the training data needs."""
    if not config.pretrained_model_name_or_path:
        raise ValueError(
            f"--finetune {config.finetune} needs --pretrained_model_name_or_path (a saved "
            "pipeline or model folder)."
        )
    if config.finetune == "lora" and config.push_to_hub:
        raise ValueError(
            "--push_to_hub is not supported with --finetune lora yet: upload the output "
            "folder's pytorch_lora_weights.safetensors with `huggingface-cli upload`."
        )
    pretrained = load_model(config.pretrained_model_name_or_path)
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
        config.finetune or "full",
        kernel_size=config.core_kernel_size,
        lora_rank=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_targets=config.lora_target_modules,
    )
    if sample_size % pretrained.size_multiple:
        raise ValueError(
            f"Size {sample_size} must be a multiple of {pretrained.size_multiple} (the "
            "fine-tuned model's patching); choose another --resolution."
        )
    pretrained.register_to_config(sample_size=sample_size)
    accelerator.print(f"{summary} (from {config.pretrained_model_name_or_path})")
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


@dataclass
class TrainingRun:
    """What :func:`setup` builds for a run: the data, the model and its training state, and
    the pipeline components for validation grids and the final pipeline."""

    config: TrainingConfig
    accelerator: Accelerator
    dataset: Any
    num_classes: int
    model: torch.nn.Module  # as prepared by accelerate (DDP, torch.compile)
    unwrapped: torch.nn.Module
    objective: Any
    optimizer: Any
    lr_scheduler: Any
    ema: EMAModel | None
    trainable: list[torch.nn.Parameter]
    use_text: bool = False
    use_aux: bool = False
    components: dict = field(default_factory=dict)
    prompts: list[str] | None = None

    @property
    def shards(self) -> bool:
        return isinstance(self.dataset, LatentShardDataset)

    @property
    def checkpointed(self) -> dict[str, Any]:
        """The objects a checkpoint holds (see :func:`.checkpointing.save_checkpoint`)."""
        # The unwrapped model: DDP and torch.compile wrappers share its parameters.
        objects = dict(
            model=self.unwrapped, optimizer=self.optimizer, lr_scheduler=self.lr_scheduler
        )
        if self.ema is not None:
            objects["ema"] = self.ema
        return objects

    @property
    def global_batch(self) -> int:
        return self.config.train_batch_size * self.accelerator.num_processes

    @property
    def share(self) -> slice:
        """This process's slice of every global batch."""
        size = self.config.train_batch_size
        return slice(
            self.accelerator.process_index * size, (self.accelerator.process_index + 1) * size
        )


def setup(config: TrainingConfig) -> TrainingRun:
    """Accelerator, data, model (new, from a config, or pre-trained for fine-tuning),
    objective, optimizer, LR schedule and EMA of ``config``, checked against each other."""
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(
            project_dir=config.output_dir, logging_dir=os.path.join(config.output_dir, "logs")
        ),
    )
    set_seed(config.seed)
    global_batch = config.train_batch_size * accelerator.num_processes
    dataset, num_classes = build_dataset(config, global_batch)
    num_classes = 0 if config.unconditional else num_classes
    check_data_arguments(config, dataset)
    shards = isinstance(dataset, LatentShardDataset)
    if shards:
        channels, _, sample_size = dataset.latent_shape
        needs = (num_classes, channels, sample_size, dataset.text_embedding_dim)
    else:
        channels = dataset[0]["pixel_values"].shape[0]
        needs = (num_classes, channels, config.resolution, None)
    if config.pretrained_model_name_or_path or config.finetune:
        model = finetuning_model(config, accelerator, *needs)
    else:
        model = build_model(config, *needs)
    use_text = shards and dataset.has_text
    if getattr(model.config, "cross_attention_dim", None) is not None and not use_text:
        raise ValueError(
            f"The model is a text model (cross_attention_dim={model.config.cross_attention_dim}) "
            "but the training data has no text embeddings: prepare caption shards with "
            "training/prepare_latents.py --webdataset_urls ... and pass --train_shards, or drop "
            "cross_attention_dim from the model config."
        )
    if config.patch_regularization_weight and not hasattr(model, "core_unpatch"):
        raise ValueError(
            "--patch_regularization_weight needs an MDiT (it regularises the core un-patch "
            f"output); {type(model).__name__} has none."
        )
    # The pipeline's other components, for validation grids and the final pipeline.
    components, prompts = {}, None
    if shards and accelerator.is_main_process:
        components["vae"] = dataset.load_vae(config.pretrained_vae_model_name_or_path)
        if use_text:
            encoder, tokenizer = dataset.load_text_encoder(config.text_encoder_name_or_path)
            components.update(text_encoder=encoder, tokenizer=tokenizer)
            prompts = config.validation_prompts or [
                dataset.caption(i) for i in range(min(4, len(dataset)))
            ]
    if config.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    kwargs = {} if config.prediction_type == "flow" else {"snr_gamma": config.snr_gamma}
    if config.prediction_type == "epsilon":
        kwargs["learned_variance"] = config.learned_variance
    objective = make_objective(config.prediction_type, **kwargs)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
    )
    lr_scheduler = get_scheduler(
        "constant_with_warmup", optimizer, num_warmup_steps=config.lr_warmup_steps
    )
    ema = None
    if config.use_ema:
        ema = EMAModel(
            trainable, decay=config.ema_decay, model_cls=type(model), model_config=model.config
        )
    unwrapped = model
    if config.torch_compile:
        model = torch.compile(model)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    if ema is not None:
        ema.to(accelerator.device)
    return TrainingRun(
        config=config, accelerator=accelerator, dataset=dataset, num_classes=num_classes,
        model=model, unwrapped=unwrapped, objective=objective, optimizer=optimizer,
        lr_scheduler=lr_scheduler, ema=ema, trainable=trainable, use_text=use_text,
        use_aux=shards and getattr(unwrapped.config, "use_aux_conditions", False),
        components=components, prompts=prompts,
    )  # fmt: skip


def resume(run: TrainingRun, settings: dict) -> tuple[int, str | None]:
    """The step to start at and the checkpoint resumed from (``None``: a fresh run). Settings
    that may change on resume (the learning rate, ...) are applied and logged."""
    config, accelerator = run.config, run.accelerator
    path = resolve_checkpoint(config.output_dir, config.resume_from_checkpoint)
    if path is None:
        return 0, None
    state = load_checkpoint(accelerator, path, run.checkpointed)
    changes = check_resume_settings(state.get("settings"), settings, path)
    if "learning_rate" in changes:
        set_learning_rate(run.optimizer, run.lr_scheduler, config.learning_rate)
    for key, (old, new) in changes.items():
        accelerator.print(f"Resuming with --{key} {new!r} (the checkpoint's run had {old!r}).")
    accelerator.print(f"Resumed from {path} at step {state['step']}.")
    return state["step"], path


def model_inputs(run: TrainingRun, batch: dict, ids: list[int], generator: torch.Generator):
    """One global batch's data to the model's inputs (like DiT's ``model_kwargs``): the noisy
    sample and timesteps of the objective, and every condition with its dropout (labels, aux
    values, text). Draws are made for the global batch from the step ``generator`` and sliced to
    this process's share, so one process with the same global batch sees exactly what all
    processes together see. Returns ``(noisy_batch, model_kwargs)``."""
    config, device, share = run.config, run.accelerator.device, run.share
    x0 = batch["latents" if run.shards else "pixel_values"].to(device, non_blocking=True)
    noisy = run.objective.prepare(x0, generator, share, run.global_batch)
    kwargs: dict[str, Any] = {"class_labels": None}
    if run.num_classes:
        labels = torch.tensor([run.dataset.label(i) for i in ids])
        labels = drop_labels(labels, run.num_classes, config.label_dropout, generator)
        kwargs["class_labels"] = labels[share].to(device)
    if run.use_aux:
        scale, aspect = drop_aux_conditions(
            *run.dataset.aux_conditions(ids), config.aux_dropout, generator
        )
        kwargs["image_scale"] = scale[share].to(device)
        kwargs["aspect_ratio"] = aspect[share].to(device)
    if run.use_text:
        states, mask = drop_text_conditions(
            batch["encoder_hidden_states"], batch["encoder_attention_mask"],
            config.caption_dropout, generator, share, run.global_batch,
        )  # fmt: skip
        kwargs["encoder_hidden_states"] = states.to(device)
        kwargs["encoder_attention_mask"] = mask.to(device)
    return noisy, kwargs


def train_step(run: TrainingRun, step: int, batches, capture) -> dict[str, torch.Tensor]:
    """One optimizer step (``--gradient_accumulation_steps`` micro-batches); returns the last
    micro-batch's losses."""
    config, accelerator, model = run.config, run.accelerator, run.model
    micro_batches = config.gradient_accumulation_steps
    for micro in range(micro_batches):
        index = step * micro_batches + micro
        generator = step_generator(config.seed, index)
        ids = batch_indices(len(run.dataset), run.global_batch, index, config.seed)
        batch = next(batches)
        if batch["index"].tolist() != ids[run.share]:
            raise RuntimeError("The data loader is out of step with the training loop.")
        noisy, kwargs = model_inputs(run, batch, ids, generator)
        with accelerator.accumulate(model):
            timesteps = noisy.model_timesteps.to(accelerator.device)
            output = model(noisy.noisy, timesteps, **kwargs).sample
            activation = capture.take() if capture is not None else None
            patch_weight = scheduled_weight(
                config.patch_regularization_weight, step, config.patch_regularization_stop_step
            )
            losses = training_losses(
                run.objective,
                output,
                noisy,
                variance_matching_weight=scheduled_weight(
                    config.variance_matching_weight, step, config.variance_matching_stop_step
                ),
                patch_activation=activation if patch_weight else None,
                patch_weight=patch_weight,
            )
            loss = losses["loss"]
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"Non-finite loss ({loss.item()}) at step {step}. The last good "
                    f"checkpoint in {config.output_dir} is kept; lower the learning rate "
                    "or use --mixed_precision no, then --resume_from_checkpoint latest."
                )
            accelerator.backward(loss)
            if accelerator.sync_gradients and config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            run.optimizer.step()
            run.lr_scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.step(run.trainable)
    return losses


def train(config: TrainingConfig | argparse.Namespace) -> TrainResult:
    """Run (or resume) training as configured (see :class:`.config.TrainingConfig`): set up,
    resume, loop over steps (checkpoints, validation grids, SIGTERM/SIGINT: save and stop),
    then save the final pipeline."""
    if isinstance(config, argparse.Namespace):
        config = TrainingConfig.from_namespace(config)
    # 1. Set up, and resume from a checkpoint.
    run = setup(config)
    accelerator = run.accelerator
    settings = run_settings(config, accelerator)
    start, checkpoint = resume(run, settings)
    if accelerator.is_main_process:
        os.makedirs(config.output_dir, exist_ok=True)
        accelerator.init_trackers("mdit", config={k: str(v) for k, v in settings.items()})

    def request_stop(signum, frame):
        # accelerate's trigger is all-reduced by check_trigger(): every process stops after the
        # same step, even when only some of them received the signal.
        accelerator.set_trigger()

    previous_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    progress = tqdm(
        total=config.max_train_steps,
        initial=start,
        disable=not accelerator.is_local_main_process,
        desc="training",
    )
    capture = (
        ActivationCapture(run.unwrapped.core_unpatch)
        if config.patch_regularization_weight
        else None
    )
    micro_batches = config.gradient_accumulation_steps
    pin = accelerator.device.type == "cuda"
    loader = training_loader(
        run.dataset, run.global_batch, config.seed, start * micro_batches,
        config.max_train_steps * micro_batches, run.share, config.random_flip,
        num_workers=config.dataloader_num_workers, pin_memory=pin,
    )  # fmt: skip
    batches = iter(loader)

    def save(step: int) -> str:
        return save_checkpoint(
            accelerator, config.output_dir, step, run.checkpointed, {"settings": settings},
            total_limit=config.checkpoints_total_limit,
        )  # fmt: skip

    # 2. The loop.
    step, loss_value = start, float("nan")
    try:
        while step < config.max_train_steps and not accelerator.check_trigger():
            losses = train_step(run, step, batches, capture)
            step += 1
            loss_value = accelerator.gather(losses["loss"].detach()[None]).mean().item()
            progress.update(1)
            progress.set_postfix(loss=f"{loss_value:.4f}")
            accelerator.log({k: v.item() for k, v in losses.items()}, step=step)
            if config.checkpointing_steps and step % config.checkpointing_steps == 0:
                checkpoint = save(step)
            if config.validation_steps and step % config.validation_steps == 0:
                validate(run, step)
        if step < config.max_train_steps or step % max(config.checkpointing_steps, 1):
            checkpoint = save(step)
    finally:
        if capture is not None:
            capture.remove()
        progress.close()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)

    # 3. The final pipeline.
    finished = step >= config.max_train_steps
    if finished and accelerator.is_main_process:
        pipe = final_pipeline(run.unwrapped, run.ema, run.objective, **run.components)
        save_final(pipe, config.output_dir, lora=config.finetune == "lora")
        if config.push_to_hub:
            pipe.push_to_hub(
                config.hub_model_id or os.path.basename(os.path.abspath(config.output_dir)),
                training_data=config.train_shards or config.train_data_dir or config.dataset_name,
                training_steps=step,
                existing_model_card="keep",  # an existing README is the user's: never replaced
            )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(
        pipeline_dir=config.output_dir,
        final_loss=loss_value,
        steps=step,
        trainable_parameters=sum(p.numel() for p in run.trainable),
        finished=finished,
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
    pipeline = family_of(model).pipeline_class
    return pipeline(transformer=transformer.eval(), scheduler=scheduler, vae=vae)


@torch.no_grad()
def validate(run: TrainingRun, step: int) -> None:
    """A sample grid (one row per class or prompt) as ``samples/step-<step>.png``."""
    if not run.accelerator.is_main_process:
        return
    pipe = final_pipeline(run.unwrapped, run.ema, run.objective, **run.components)
    pipe = pipe.to(run.accelerator.device)
    config = run.config
    images = sample_grid(
        pipe, run.num_classes, 8, config.num_validation_steps, config.seed, run.prompts
    )
    folder = os.path.join(config.output_dir, "samples")
    os.makedirs(folder, exist_ok=True)
    rows = len(run.prompts) if run.prompts else run.num_classes or 10
    save_grid(images, rows, os.path.join(folder, f"step-{step:06d}.png"))
