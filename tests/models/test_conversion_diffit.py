"""The official NVIDIA DiffiT checkpoints through ``DiffiTTransformer2DModel.from_single_file``.

``fixtures/diffit_official_tiny.safetensors`` was generated once, outside the repository, with
the official code (NVlabs/DiffiT 9f6f0a5 ``diffit/diffit.py``, timm 1.0.31; the sampler of
sail-sg/MDT's ``masked_diffusion``): random weights of a tiny official ``DiffiT`` in the official
layout (``official.*``), fixed inputs and the official outputs of ``forward`` (``forward.*``),
``forward_with_cfg`` at scale 4.4 (``cfg.*``) and a 5-step ``p_sample_loop`` (``sample.*``, used
by tests/pipelines/test_diffit_official.py), and the official 250-step respacing.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffusers_mdit import DiffiTTransformer2DModel
from diffusers_mdit.models import conversion_diffit
from diffusers_mdit.models.conversion_diffit import infer_diffit_config, official_diffit_scheduler
from diffusers_mdit.pipelines.guidance import apply_guidance, guidance_scale_at

FIXTURE = Path(__file__).parent / "fixtures" / "diffit_official_tiny.safetensors"


def fixture() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE)


def fixture_config() -> dict:
    with safe_open(FIXTURE, "pt") as handle:
        return json.loads(handle.metadata()["config"])


def official_state_dict() -> dict[str, torch.Tensor]:
    prefix = "official."
    return {k[len(prefix) :]: v for k, v in fixture().items() if k.startswith(prefix)}


def write_checkpoint(tmp_path: Path, state_dict=None, name="diffit.safetensors") -> Path:
    path = tmp_path / name
    save_file(official_state_dict() if state_dict is None else state_dict, path)
    return path


def test_config_is_inferred_from_the_tensor_shapes():
    config = infer_diffit_config(official_state_dict())
    official = fixture_config()
    assert config["sample_size"] == official["input_size"]
    assert config["patch_size"] == official["patch_size"]
    assert config["hidden_size"] == official["hidden_size"]
    assert config["num_layers"] == official["depth"]
    assert config["num_attention_heads"] == official["num_heads"]
    assert config["num_classes"] == official["num_classes"]
    assert config["out_channels"] == 2 * official["in_channels"]  # learned sigma


def test_converted_model_reproduces_the_official_network(tmp_path):
    data = fixture()
    model = DiffiTTransformer2DModel.from_single_file(write_checkpoint(tmp_path))
    with torch.no_grad():
        out = model(data["forward.x"], data["forward.t"], data["forward.y"]).sample
    assert out.shape == data["forward.out"].shape
    assert (out - data["forward.out"]).abs().max() < 1e-5  # measured 1.0e-7 (|out| <= 0.33)


def test_three_channel_power_cosine_guidance_reproduces_official_forward_with_cfg(tmp_path):
    """Their ``forward_with_cfg`` (batch ``[cond, uncond]``, ramp from the timestep, guidance
    on 3 channels) against our model + :func:`guidance_scale_at` + :func:`apply_guidance`."""
    data = fixture()
    model = DiffiTTransformer2DModel.from_single_file(write_checkpoint(tmp_path))
    x, t, y = data["cfg.x"], data["cfg.t"], data["cfg.y"]
    half = x.shape[0] // 2
    with torch.no_grad():
        out = model(x, t, y).sample
    for i in range(half):
        scale = guidance_scale_at(4.4, 0, 1, "power-cosine", 4.0, timestep=t[i])
        guided = apply_guidance(out[i : i + 1], out[half + i : half + i + 1], scale, channels=3)
        assert (guided - data["cfg.out"][i : i + 1]).abs().max() < 1e-5


def test_official_scheduler_gives_the_official_respacing():
    scheduler = official_diffit_scheduler()
    scheduler.set_timesteps(250)
    official = fixture()["timesteps.official_250"]
    assert torch.equal(scheduler.timesteps.flip(0), official)


def test_folding_and_row_permutation_are_both_needed(tmp_path):
    """Without either conversion the outputs differ clearly: the fixture would catch a change
    of our layout."""
    data = fixture()
    state = official_state_dict()
    model = DiffiTTransformer2DModel.from_single_file(write_checkpoint(tmp_path))
    converted = conversion_diffit.convert_diffit_state_dict(state, model)
    for broken in ("fold", "permute"):
        wrong = dict(converted)
        if broken == "fold":
            unfolded = state["blocks.0.attn.qkv.bias"].chunk(3)
            for name, part in zip("qkv", unfolded, strict=True):
                wrong[f"blocks.0.attn.to_{name}.bias"] = part
        else:
            wrong["proj_out.weight"] = state["final_layer.linear.weight"]
        model.load_state_dict(wrong)
        with torch.no_grad():
            out = model(data["forward.x"], data["forward.t"], data["forward.y"]).sample
        assert (out - data["forward.out"]).abs().max() > 1e-2, broken


# -- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.pop("blocks.1.attn.qkv_temb.bias"), "blocks.1.attn.qkv_temb.bias"),
        (lambda s: s.pop("final_layer.linear.bias"), "final_layer.linear.bias"),
        (lambda s: s.update({"blocks.0.attn.extra": torch.zeros(1)}), "blocks.0.attn.extra"),
        (lambda s: s.update({"blocks.2.mlp.fc1.weight": torch.zeros(1)}), "blocks.2.mlp.fc1"),
        (
            lambda s: s.update({"blocks.1.mlp.fc2.weight": s["blocks.1.mlp.fc2.weight"][:, :-1]}),
            "blocks.1.mlp.fc2.weight",
        ),
        (lambda s: s.pop("pos_embed"), "pos_embed"),
        (lambda s: s["pos_embed"].mul_(1.5), "pos_embed"),
        (
            lambda s: s["blocks.0.attn.relative_position_index"].copy_(
                s["blocks.0.attn.relative_position_index"].flip(0)
            ),
            "blocks.0.attn.relative_position_index",
        ),
    ],
    ids=["missing-folded", "missing", "unknown", "extra-block", "mis-shaped", "no-pos", "pos",
         "index"],
)  # fmt: skip
def test_a_checkpoint_that_is_not_the_official_network_is_refused_by_name(
    tmp_path, change, message
):
    state = official_state_dict()
    change(state)
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        DiffiTTransformer2DModel.from_single_file(write_checkpoint(tmp_path, state))


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_pickle_is_never_unpickled_with_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "diffit.pt"
    with open(path, "wb") as handle:
        pickle.dump({"x_embedder.proj.weight": _RunsCode()}, handle, protocol=2)
    with pytest.raises(ValueError, match="refused"):
        DiffiTTransformer2DModel.from_single_file(path)
    assert not (tmp_path / "pwned").exists()


def test_a_plain_tensor_pickle_loads_with_weights_only(tmp_path):
    data = fixture()
    path = tmp_path / "diffit.pt"
    torch.save(official_state_dict(), path)
    model = DiffiTTransformer2DModel.from_single_file(path)
    with torch.no_grad():
        out = model(data["forward.x"], data["forward.t"], data["forward.y"]).sample
    assert (out - data["forward.out"]).abs().max() < 1e-5


def test_other_files_are_refused(tmp_path):
    path = tmp_path / "diffit.npz"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="not a .safetensors"):
        DiffiTTransformer2DModel.from_single_file(path)
    with pytest.raises(ValueError, match="neither a local file"):
        DiffiTTransformer2DModel.from_single_file(tmp_path / "missing.safetensors")


@pytest.mark.parametrize(
    "link, revision",
    [
        ("nvidia/DiffiT/diffit_256.safetensors", None),
        ("https://huggingface.co/nvidia/DiffiT/blob/main/diffit_256.safetensors", "main"),
        ("hf.co/nvidia/DiffiT/diffit_256.safetensors", None),
    ],
)
def test_hub_files_go_through_hf_hub_download(tmp_path, monkeypatch, link, revision):
    local = write_checkpoint(tmp_path)
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs.get("revision")))
        return str(local)

    monkeypatch.setattr(conversion_diffit, "hf_hub_download", fake_download)
    model = DiffiTTransformer2DModel.from_single_file(link)
    assert calls == [("nvidia/DiffiT", "diffit_256.safetensors", revision)]
    assert model.config._name_or_path == link


def test_torch_dtype_applies_and_a_config_override_contradicting_the_weights_is_refused(tmp_path):
    path = write_checkpoint(tmp_path)
    model = DiffiTTransformer2DModel.from_single_file(path, torch_dtype=torch.float64)
    assert model.dtype == torch.float64
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.relative_position_bias_table"):
        DiffiTTransformer2DModel.from_single_file(path, num_attention_heads=4)
