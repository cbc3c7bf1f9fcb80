"""The training configuration: one typed dataclass, from which the command line is built.

``TrainingConfig`` is what :func:`.trainer.train` takes. Scripts parse it from flags
(``TrainingConfig.parse_args()``, every field a ``--<field>`` flag with the diffusers examples'
names where one exists); Python code builds it directly::

    from diffusers_mdit.training import TrainingConfig, train

    train(TrainingConfig(output_dir="outputs/run", preset="MDiT-S", max_train_steps=200))
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from .finetuning import FINETUNE_MODES


def option(default: Any, help: str = "", **argparse_options: Any) -> Any:
    """A field with its ``--help`` text and extra argparse options (``choices``, ...)."""
    return field(default=default, metadata={"help": help, **argparse_options})


@dataclass
class TrainingConfig:
    """Every setting of a training run; each field is also the command-line flag ``--<name>``."""

    # -- run --------------------------------------------------------------------------------
    output_dir: str = option("outputs/mdit", "Checkpoints, samples, final pipeline.")
    seed: int = option(0, "Seed of the batches, noise, dropout and flips (with the step).")
    # -- model ------------------------------------------------------------------------------
    preset: str = option("MDiT-S", "A from_preset name (see list_presets()).")
    model_config: str | None = option(
        None,
        "A model config JSON instead of --preset (a config.json of a saved model: its "
        "_class_name picks the model class, MDiT when absent).",
    )
    # -- data -------------------------------------------------------------------------------
    dataset_name: str = option("digits", "'digits' (built in) or a datasets name.")
    train_data_dir: str | None = option(None, "An imagefolder directory (overrides name).")
    image_column: str = option("image")
    label_column: str = option("label")
    max_train_samples: int | None = option(
        None,
        "Train on the first N samples only (the digits: of the training part left by "
        "--held_out_fraction, in dataset order; other image datasets: the first N rows). A "
        "subset smaller than the global batch is repeated whole to fill it.",
    )
    held_out_fraction: float = option(
        0.0,
        "Digits only: never train on a held-out split, this fraction of every class, "
        "drawn with seed 0 (diffusers_mdit.data.digits_split, the MLP probe's split); 0 = none.",
    )
    resolution: int = option(16)
    random_flip: bool = option(
        False, "Horizontal flips at random; latent shards draw the stored flipped latent."
    )
    train_shards: str | None = option(
        None,
        "Latent shards (a folder or a glob) written by training/prepare_latents.py; "
        "replaces the image dataset, the model size follows the latents (--resolution unused).",
    )
    pretrained_vae_model_name_or_path: str | None = option(
        None, "VAE of the final pipeline and validation grids; default: the shards' VAE."
    )
    text_encoder_name_or_path: str | None = option(
        None, "Text encoder of the final pipeline (text shards); default: the shards' encoder."
    )
    dataloader_num_workers: int = option(
        0, "Processes that decode the data (0: the main process). Batches do not depend on it."
    )
    # -- conditioning -----------------------------------------------------------------------
    caption_dropout: float = option(0.1, "Text dropout for CFG (text shards).")
    use_aux_conditions: bool = option(
        False, "Condition an MDiT on the shards' image scale and aspect ratio (G.4, ImageNet)."
    )
    aux_dropout: float = option(0.1, "Scale/aspect dropout (G.4).")
    unconditional: bool = option(False, "Ignore labels (num_classes=0).")
    label_dropout: float = option(0.1)
    # -- objective --------------------------------------------------------------------------
    prediction_type: str = option("x0", choices=["x0", "epsilon", "flow"])
    snr_gamma: float = option(5.0, "Min-SNR gamma (x0, epsilon).")
    learned_variance: bool = option(False, "epsilon: DiT's hybrid loss.")
    variance_matching_weight: float = option(0.0)
    variance_matching_stop_step: int | None = option(None)
    patch_regularization_weight: float = option(0.0)
    patch_regularization_stop_step: int | None = option(None)
    # -- optimisation -----------------------------------------------------------------------
    train_batch_size: int = option(32, "Per process.")
    gradient_accumulation_steps: int = option(1)
    max_train_steps: int = option(1000)
    learning_rate: float = option(4e-4)
    lr_warmup_steps: int = option(0)
    adam_beta1: float = option(0.9)
    adam_beta2: float = option(0.95)
    adam_weight_decay: float = option(0.01)
    max_grad_norm: float = option(1.0)
    use_ema: bool = option(False)
    ema_decay: float = option(0.9999)
    mixed_precision: str = option("no", choices=["no", "fp16", "bf16"])
    gradient_checkpointing: bool = option(False)
    torch_compile: bool = option(
        False, "torch.compile the transformer (needs a C++ compiler on CPU; first steps slow)."
    )
    # -- checkpoints and validation ---------------------------------------------------------
    checkpointing_steps: int = option(500)
    checkpoints_total_limit: int = option(3)
    resume_from_checkpoint: str | None = option(None, "A checkpoint folder or 'latest'.")
    validation_steps: int = option(0, "Sample grid PNG every N steps.")
    num_validation_steps: int = option(25, "Sampler steps for grids.")
    validation_prompts: list[str] | None = option(
        None, "Prompts of the text grids; default: the first 4 captions of the shards."
    )
    # -- fine-tuning ------------------------------------------------------------------------
    pretrained_model_name_or_path: str | None = option(
        None,
        "Start from a trained model: a saved pipeline folder (its transformer/) or model "
        "folder. --preset/--model_config are then unused.",
    )
    finetune: str | None = option(
        None,
        "With --pretrained_model_name_or_path: train everything (full, the default), only "
        "the aggregate blocks with neighborhood core attention (aggregate, MDiT J.1), only the "
        "replicated larger core patch projections (patch, J.2), or LoRA adapters (lora).",
        choices=list(FINETUNE_MODES),
    )
    core_kernel_size: int = option(15, "--finetune aggregate: NA kernel.")
    lora_rank: int = option(16)
    lora_alpha: float | None = option(None, "LoRA alpha; default: the rank.")
    lora_target_modules: list[str] | None = option(
        None, "Module names or groups to adapt; default: attention and feed-forward projections."
    )
    # -- reporting --------------------------------------------------------------------------
    report_to: str = option("tensorboard", "tensorboard, wandb, all or none.")
    push_to_hub: bool = option(False)
    hub_model_id: str | None = option(None)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Add one ``--<field>`` flag per field to ``parser``: booleans are switches, lists
        take one or more values, ``X | None`` fields default to ``None``."""
        hints = typing.get_type_hints(cls)
        for spec in dataclasses.fields(cls):
            options = dict(spec.metadata)
            kind = hints[spec.name]
            options.setdefault("help", "")
            if options["help"] or spec.default is not None:
                shown = "" if spec.default in (None, False) else f" (default: {spec.default})"
                options["help"] = f"{options['help']}{shown}".strip()
            if kind is bool:
                parser.add_argument(f"--{spec.name}", action="store_true", **options)
                continue
            args = [a for a in typing.get_args(kind) if a is not type(None)] or [kind]
            base = args[0]
            if typing.get_origin(base) is list:
                options.update(nargs="+", type=typing.get_args(base)[0])
            elif base is not str:
                options["type"] = base
            parser.add_argument(f"--{spec.name}", default=spec.default, **options)
        return parser

    @classmethod
    def parse_args(
        cls, argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None
    ) -> TrainingConfig:
        """A config from command-line flags (``sys.argv`` when ``argv`` is ``None``)."""
        parser = parser or cls.add_arguments(argparse.ArgumentParser())
        return cls.from_namespace(parser.parse_args(argv))

    @classmethod
    def from_namespace(cls, namespace: argparse.Namespace) -> TrainingConfig:
        names = {spec.name for spec in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(namespace).items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainingConfig:
        """A copy with ``changes`` (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)
