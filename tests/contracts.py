"""Contract tests written once and run over every model and pipeline of the package: the
properties diffusers' own ``ModelTesterMixin`` and ``PipelineTesterMixin`` check, on CPU with
tiny configs.

A test class mixes in :class:`ModelContract` or :class:`PipelineContract` and provides the
component and its inputs. Our models zero-initialise their output layers, so a fresh model
predicts exactly 0 and every comparison would pass trivially: the model fixtures perturb all
weights (:func:`diffusers_mdit.testing.randomize`) before comparing.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusers_mdit.lora import lora_config


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=atol)


def _public(config) -> dict[str, Any]:
    """A config without diffusers' and our bookkeeping (``_name_or_path``, versions), as JSON
    stores it (tuples become lists)."""
    return json.loads(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}))


def _to_legacy_names(state: dict[str, torch.Tensor], fused_qkv: bool) -> dict[str, torch.Tensor]:
    """Inverse of ``convert_legacy_attention_keys``: the names of folders saved before the
    diffusers naming (``fused_qkv``: DiffiT's TMSA stored one ``to_qkv``)."""
    legacy = {}
    for key, value in state.items():
        split = re.match(r"^(.*attn)\.to_([qkv])\.(weight|bias)$", key)
        if fused_qkv and split:
            prefix, _, kind = split.groups()
            parts = [state[f"{prefix}.to_{name}.{kind}"] for name in "qkv"]
            legacy[f"{prefix}.to_qkv.{kind}"] = torch.cat(parts)
            continue
        key = re.sub(r"^(.*cross_attn)\.to_(k|v)\.weight$", r"\1.to_\2_cond.weight", key)
        key = re.sub(r"^(.*attn)\.to_out\.0\.(weight|bias)$", r"\1.to_out.\2", key)
        legacy[key] = value
    return legacy


class ModelContract:
    """Provide ``model`` (a fixture: a randomised model in eval mode) and
    ``inputs(self, batch) -> dict`` (keyword arguments of ``forward``, deterministic)."""

    fused_legacy_qkv = False
    legacy_attention_names = True  # False: the model never had names of its own
    attention_kwargs_name = "attention_kwargs"

    def inputs(self, batch: int = 2) -> dict[str, Any]:
        raise NotImplementedError

    def output(self, model, **overrides) -> torch.Tensor:
        with torch.no_grad():
            return model(**{**self.inputs(), **overrides}).sample

    def test_output_is_deterministic_and_not_trivial(self, model):
        first, second = self.output(model), self.output(model)
        assert torch.equal(first, second)
        assert first.abs().max() > 1e-4  # the perturbed weights reach the output

    def test_save_load_is_exact(self, model, tmp_path):
        model.save_pretrained(tmp_path)
        assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
        loaded = type(model).from_pretrained(tmp_path).eval()
        assert torch.equal(self.output(model), self.output(loaded))
        assert _public(loaded.config) == _public(model.config)
        saved, reloaded = model.state_dict(), loaded.state_dict()
        assert list(saved) == list(reloaded)
        for name, tensor in saved.items():
            assert torch.equal(tensor, reloaded[name]), name

    def test_old_attention_names_load(self, model, tmp_path):
        """Folders saved before the diffusers attention naming (``to_out``, DiffiT's fused
        ``to_qkv``, MDiT's ``to_k_cond``) load to the same model."""
        if not self.legacy_attention_names:
            pytest.skip("diffusers' module names from the start")
        model.save_pretrained(tmp_path)
        path = tmp_path / "diffusion_pytorch_model.safetensors"
        legacy = _to_legacy_names(load_file(path), self.fused_legacy_qkv)
        assert set(legacy) != set(model.state_dict())
        save_file(legacy, path)
        loaded = type(model).from_pretrained(tmp_path).eval()
        assert torch.equal(self.output(model), self.output(loaded))

    def test_from_pretrained_torch_dtype(self, model, tmp_path):
        model.save_pretrained(tmp_path)
        loaded = type(model).from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
        assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
        out = self.output(loaded.eval())
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()

    def test_batch_equals_single_samples(self, model):
        batched = self.output(model)
        for i in range(batched.shape[0]):
            single = {
                k: v[i : i + 1] if isinstance(v, torch.Tensor) and v.ndim else v
                for k, v in self.inputs().items()
            }
            _close(self.output(model, **single)[0], batched[i], atol=1e-5)

    def test_gradient_checkpointing_gives_equal_outputs_and_gradients(self, model):
        def run(m):
            m.zero_grad()
            out = m(**self.inputs()).sample
            out.square().mean().backward()
            return out.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]

        model.train()
        plain = run(model)
        checkpointed = copy.deepcopy(model)
        checkpointed.enable_gradient_checkpointing()
        assert checkpointed.is_gradient_checkpointing
        again = run(checkpointed)
        torch.testing.assert_close(again[0], plain[0], rtol=0, atol=1e-6)
        assert len(again[1]) == len(plain[1])
        for a, b in zip(again[1], plain[1], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)

    @pytest.mark.parametrize("storage", [torch.float8_e4m3fn, torch.float16])
    def test_layerwise_casting(self, model, storage):
        reference = self.output(model)
        model.enable_layerwise_casting(storage_dtype=storage, compute_dtype=torch.float32)
        out = self.output(model)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        scale = reference.abs().max()
        assert (out - reference).abs().max() < (0.5 if storage == torch.float8_e4m3fn else 0.05)
        assert scale > 0

    def test_attention_processors_backend_and_fused_projections(self, model):
        reference = self.output(model)
        processors = model.attn_processors
        assert processors
        model.set_attn_processor(dict(processors))
        model.set_attention_backend("native")
        _close(self.output(model), reference)
        model.reset_attention_backend()
        model.fuse_qkv_projections()
        _close(self.output(model), reference)
        model.unfuse_qkv_projections()
        assert torch.equal(self.output(model), reference)

    def test_diffusers_default_lora_targets_and_call_time_scale(self, model):
        """diffusers' training scripts' targets (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) adapt
        every attention layer, and ``attention_kwargs={"scale": 0}`` switches them off."""
        from peft import LoraConfig

        reference = self.output(model)
        model.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if "lora_A" in n}
        attention = [n for n, m in model.named_modules() if hasattr(m, "get_processor")]
        for name in attention:
            assert {f"{name}.to_q", f"{name}.to_out.0"} <= adapted, name
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.5)
        changed = self.output(model)
        assert (changed - reference).abs().max() > 1e-4
        kwargs = self.attention_kwargs_name
        _close(self.output(model, **{kwargs: {"scale": 0.0}}), reference)
        _close(self.output(model, **{kwargs: {"scale": 1.0}}), changed)

    def test_package_lora_groups_adapt(self, model):
        model.add_adapter(lora_config(rank=2))
        assert any("lora_A" in n for n, _ in model.named_parameters())


class PipelineContract:
    """Provide ``pipe`` (a fixture) and ``call_inputs(self) -> dict`` (the call's arguments,
    a few steps, ``output_type="latent"``)."""

    def call_inputs(self) -> dict[str, Any]:
        raise NotImplementedError

    def run(self, pipe, **overrides):
        inputs = {**self.call_inputs(), "generator": torch.Generator().manual_seed(0)}
        return pipe(**{**inputs, **overrides}).images

    def test_deterministic_with_a_generator(self, pipe):
        assert torch.equal(self.run(pipe), self.run(pipe))

    def test_interrupt_at_the_last_step(self, pipe):
        """diffusers' pattern: ``pipe._interrupt = True`` in a callback skips the remaining
        steps, and the result is the latents of that step."""
        steps = self.call_inputs()["num_inference_steps"]
        seen = {}

        def record(p, i, t, kwargs):
            seen[i] = kwargs["latents"].clone()
            return kwargs

        full = self.run(
            pipe, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["latents"]
        )
        assert pipe.num_timesteps == steps
        stop = steps - 2

        def interrupt(p, i, t, kwargs):
            if i == stop:
                p._interrupt = True
            return kwargs

        out = self.run(pipe, callback_on_step_end=interrupt)
        assert torch.equal(out, seen[stop]) and not torch.equal(out, full)

    def test_guidance_changed_by_a_callback(self, pipe):
        """The callback sees and sets ``guidance_scale``; switching guidance off mid-run
        (``pipe._guidance_scale = 0.0``) runs the remaining steps unguided."""
        inputs = self.call_inputs()
        if not self.guided:
            pytest.skip("this configuration has no unconditional branch")
        steps = inputs["num_inference_steps"]
        scales = []

        def off_half_way(p, i, t, kwargs):
            scales.append(p.guidance_scale)
            assert p.do_classifier_free_guidance == (i < steps // 2 or i == 0)
            if i == steps // 2 - 1:
                p._guidance_scale = 0.0
            return kwargs

        switched = self.run(pipe, guidance_scale=3.0, callback_on_step_end=off_half_way)
        assert scales[0] == 3.0 and scales[-1] == 0.0
        guided = self.run(pipe, guidance_scale=3.0)
        unguided = self.run(pipe, guidance_scale=1.0)
        assert not torch.equal(switched, guided) and not torch.equal(switched, unguided)

    guided = True

    def test_num_images_per_prompt(self, pipe):
        one = self.run(pipe)
        three = self.run(pipe, num_images_per_prompt=3)
        assert three.shape[0] == 3 * one.shape[0] and three.shape[1:] == one.shape[1:]

    def test_offload_sequence_names_every_model_component(self, pipe):
        """``enable_model_cpu_offload`` moves the models in ``model_cpu_offload_seq`` order: it
        must name every ``nn.Module`` component present, in the order they run."""
        sequence = pipe.model_cpu_offload_seq.split("->")
        modules = {
            name
            for name, component in pipe.components.items()
            if isinstance(component, torch.nn.Module)
        }
        assert modules <= set(sequence)
        assert sequence.index("transformer") < sequence.index("vae")
        if "text_encoder" in sequence:
            assert sequence.index("text_encoder") < sequence.index("transformer")
