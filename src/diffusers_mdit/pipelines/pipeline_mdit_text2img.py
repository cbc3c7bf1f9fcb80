"""MDiTTextToImagePipeline: text-conditioned MDiT with a T5 encoder (the paper's CC3M setup)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers.models import AutoencoderKL
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import PreTrainedTokenizerBase, T5EncoderModel

from ..models import MDiTTransformer2DModel
from .base import TransformerDiffusionPipeline, sampling_arguments
from .pipeline_mdit import MDiTCoreOptionsMixin


class MDiTTextToImagePipeline(MDiTCoreOptionsMixin, TransformerDiffusionPipeline):
    r"""Text-to-image sampling with an MDiT built with ``cross_attention_dim`` equal to the text
    encoder's width (1024 for FLAN-T5-L).

    Prompts are tokenised to at most ``max_sequence_length`` tokens (16, as the paper's CC3M
    captions) and padded to that length; padding is masked out of the cross-attention. The
    unconditional branch of classifier-free guidance is the negative prompt when given, else
    no text at all (every text token masked: the model attends to its null and time tokens
    only), which is what caption dropout trains.

    Args:
        transformer: The MDiT model (``cross_attention_dim`` set).
        scheduler: A diffusers scheduler (see :class:`MDiTPipeline`).
        text_encoder: A ``T5EncoderModel``.
        tokenizer: Its tokenizer.
        vae: Optional ``AutoencoderKL``.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"

    def __init__(
        self,
        transformer: MDiTTransformer2DModel,
        scheduler: KarrasDiffusionSchedulers,
        text_encoder: T5EncoderModel,
        tokenizer: PreTrainedTokenizerBase,
        vae: AutoencoderKL | None = None,
    ):
        super().__init__()
        self.register_modules(
            transformer=transformer,
            scheduler=scheduler,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            vae=vae,
        )
        self._setup_image_processor()

    def encode_prompt(
        self,
        prompt: str | list[str],
        num_images_per_prompt: int = 1,
        max_sequence_length: int = 16,
        device: torch.device | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embeddings (B, S, D), attention mask (B, S))`` of the prompts, each repeated
        ``num_images_per_prompt`` times, in the text encoder's dtype. Needs only the tokenizer
        and text encoder (a pipeline built with ``transformer=None`` encodes too), so prompts
        can be encoded once and passed as ``prompt_embeds``."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=max_sequence_length,
            truncation=True,
            return_tensors="pt",
        )
        device = device or self._execution_device
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        embeddings = self.text_encoder(ids, attention_mask=mask).last_hidden_state
        return (
            embeddings.repeat_interleave(num_images_per_prompt, 0),
            mask.repeat_interleave(num_images_per_prompt, 0),
        )

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 3.0,
        guidance_schedule: str = "constant",
        guidance_power: float = 4.0,
        guidance_channels: int | None = None,
        eta: float = 1.0,
        max_sequence_length: int = 16,
        dynamic_thresholding: tuple[float, float] | None = None,
        core_attention: str | None = None,
        core_kernel_size: int | None = None,
        core_patch_schedule: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""Generate images from text.

        Args:
            prompt: Prompt(s); or give ``prompt_embeds`` instead.
            negative_prompt: Prompt(s) for the unconditional branch; ``None`` = no text.
            max_sequence_length: Token budget per prompt (16 in the paper).
            prompt_embeds, prompt_attention_mask: Text encoder states ``(B, S, D)`` and their
                mask ``(B, S)`` (default: all tokens valid), e.g. from :meth:`encode_prompt`
                with ``num_images_per_prompt=1``; repeated ``num_images_per_prompt`` times.
            negative_prompt_embeds, negative_prompt_attention_mask: The same for the
                unconditional branch, instead of ``negative_prompt``.
            Other arguments (``core_attention``, ``core_patch_schedule`` for sizes above the
            training size included): as :meth:`MDiTPipeline.__call__`.
        """
        sampling = sampling_arguments(locals())
        config = self.transformer.config
        if config.cross_attention_dim is None:
            raise ValueError(
                "The transformer has no text conditioning; build it with cross_attention_dim "
                "set to the text encoder width."
            )
        # 1. Check inputs
        height = height or self.default_size()
        width = width or self.default_size()
        self.check_common_inputs(
            height, width, num_inference_steps, output_type, callback_on_step_end_tensor_inputs
        )
        self.check_core_patch_schedule(core_patch_schedule, height, width)
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(
                f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}."
            )

        # 2. Text states, and the unconditional branch of classifier-free guidance
        count = num_images_per_prompt
        embeddings, mask = self._text_states(
            "prompt", prompt, prompt_embeds, prompt_attention_mask, count, max_sequence_length
        )
        negative = negative_prompt is not None or negative_prompt_embeds is not None
        if negative:
            neg, neg_mask = self._text_states(
                "negative_prompt",
                negative_prompt,
                negative_prompt_embeds,
                negative_prompt_attention_mask,
                count,
                max_sequence_length,
            )
            if neg.shape[0] != embeddings.shape[0]:
                raise ValueError(
                    f"The negative prompts give {neg.shape[0] // count} entries for "
                    f"{embeddings.shape[0] // count} prompts; give one per prompt."
                )
        dtype = self.transformer.dtype
        conditional = {
            "encoder_hidden_states": embeddings.to(dtype),
            "encoder_attention_mask": mask,
        }
        unconditional = None
        if guidance_scale != 1.0:
            if not negative:
                unconditional = {
                    "encoder_hidden_states": torch.zeros_like(conditional["encoder_hidden_states"]),
                    "encoder_attention_mask": torch.zeros_like(mask),
                }
            else:
                unconditional = {
                    "encoder_hidden_states": neg.to(dtype),
                    "encoder_attention_mask": neg_mask,
                }
        if config.num_classes:
            null = torch.full((embeddings.shape[0],), config.num_classes, device=embeddings.device)
            conditional["class_labels"] = null
            if unconditional is not None:
                unconditional["class_labels"] = null

        # 3. Initial latents
        latents = self.prepare_latents(embeddings.shape[0], height, width, generator, latents)

        # 4. Denoise with the call's core options, then decode
        with self.core_settings(core_attention, core_kernel_size, core_patch_schedule) as before:
            return self.generate(
                latents, conditional, unconditional, sampling, output_type, return_dict, before
            )

    def _text_states(
        self,
        name: str,
        prompt: str | list[str] | None,
        embeds: torch.Tensor | None,
        mask: torch.Tensor | None,
        num_images_per_prompt: int,
        max_sequence_length: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder states and mask of ``name`` (``prompt`` or ``negative_prompt``) from its text
        or its ``*_embeds`` (exactly one of them), repeated ``num_images_per_prompt`` times."""
        if embeds is None:
            if mask is not None:
                raise ValueError(f"{name}_attention_mask was given without {name}_embeds.")
            prompts = _prompt_list(name, prompt)
            return self.encode_prompt(prompts, num_images_per_prompt, max_sequence_length)
        if prompt is not None:
            raise ValueError(f"Give {name} or {name}_embeds, not both.")
        width = self.transformer.config.cross_attention_dim
        if embeds.ndim != 3 or embeds.shape[-1] != width:
            raise ValueError(
                f"{name}_embeds must be (batch, tokens, {width}), got {tuple(embeds.shape)}."
            )
        device = self._execution_device
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=device)
        elif tuple(mask.shape) != tuple(embeds.shape[:2]):
            raise ValueError(
                f"{name}_attention_mask must be (batch, tokens) = {tuple(embeds.shape[:2])}, got "
                f"{tuple(mask.shape)}."
            )
        return (
            embeds.to(device).repeat_interleave(num_images_per_prompt, 0),
            mask.to(device).repeat_interleave(num_images_per_prompt, 0),
        )


def _prompt_list(name: str, prompt) -> list[str]:
    """``prompt`` (a string or a non-empty list of strings) as a list."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(
            f"{name} must be a string or a non-empty list of strings, got {prompt!r}; pass e.g. "
            f'{name}="a photo of a dog".'
        )
    wrong = [p for p in prompts if not isinstance(p, str)]
    if wrong:
        raise ValueError(f"{name} must hold only strings, got {wrong[0]!r} in {prompts!r}.")
    return list(prompts)
