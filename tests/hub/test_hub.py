"""Saving, the Hub round trip and loading checks (diffusers_mdit.hub), with tiny models on CPU.

Loads the diffusers way and pushes run in fresh processes (see hub_jobs.py) against a fake Hub
on 127.0.0.1 (fake_hub.py) driven by the real huggingface_hub client; nothing reaches the Hub.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from fake_hub import NAMESPACE, FakeHub
from hub_jobs import model_output, sample
from huggingface_hub import ModelCard

import diffusers_mdit
from diffusers_mdit import (
    DiffiTPipeline,
    DiffiTUNet2DModel,
    MDiTPipeline,
    MDiTTextToImagePipeline,
    MDiTTransformer2DModel,
)
from diffusers_mdit.hub import HUB_CODE_FILE, VERSION_KEY, _resource, create_model_card
from diffusers_mdit.testing import (
    TINY_DIFFIT_UNET,
    ddim_x0,
    randomize,
    tiny_mdit,
    tiny_text_encoder,
    tiny_vae,
)

JOBS = Path(__file__).with_name("hub_jobs.py")
CARD = dict(
    training_data="ImageNet-1k 256px (test)",
    training_steps=1234,
    license="apache-2.0",
    tags=["tiny-test"],
)


def tiny_pipelines() -> dict[str, tuple[DiffusionPipeline, dict]]:
    """Every pipeline kind, each with JSON-able call arguments for the fresh processes."""
    vae = tiny_vae()
    text_encoder, tokenizer = tiny_text_encoder()
    diffit = DiffiTUNet2DModel(**TINY_DIFFIT_UNET)
    return {
        "mdit": (
            MDiTPipeline(transformer=tiny_mdit(in_channels=3, num_classes=10), scheduler=ddim_x0()),
            {"class_labels": [1, 7], "guidance_scale": 3.0},
        ),
        "mdit-vae": (
            MDiTPipeline(transformer=tiny_mdit(1, num_classes=10), scheduler=ddim_x0(), vae=vae),
            {"class_labels": [3]},
        ),
        "diffit": (
            DiffiTPipeline(transformer=randomize(diffit, 2), scheduler=DDIMScheduler()),
            {"batch_size": 2},
        ),
        "text": (
            MDiTTextToImagePipeline(
                transformer=tiny_mdit(3, in_channels=3, cross_attention_dim=32),
                scheduler=ddim_x0(),
                text_encoder=text_encoder,
                tokenizer=tokenizer,
            ),
            {"prompt": ["a red cube"], "guidance_scale": 3.0},
        ),
    }


def run_jobs(command: str, spec: object, folder: Path, env: dict[str, str] | None = None) -> None:
    """``hub_jobs.py command`` in a fresh Python process, with a cache of its own."""
    spec_file = folder / f"{command}.json"
    spec_file.write_text(json.dumps(spec))
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    environment.pop("TRANSFORMERS_OFFLINE", None)
    environment.update(
        OMP_NUM_THREADS="1",  # as single_thread below
        HF_HOME=str(folder / "hf-home"),
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        **(env or {}),
    )
    result = subprocess.run(
        [sys.executable, str(JOBS), command, str(spec_file)],
        cwd=folder,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-6000:]


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One torch thread here and in the fresh processes: the models are tiny, and on a busy
    machine the OpenMP thread pool turned 30 ms samples into seconds. Same thread count on both
    sides also means the same kernels for the bit-exact comparisons."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """The tiny pipelines and an MDiT model saved to folders, with their reference outputs."""
    root = tmp_path_factory.mktemp("saved")
    tiny = tiny_pipelines()
    pipelines = {}
    for name, (pipe, call) in tiny.items():
        pipe.save_pretrained(root / name)
        pipelines[name] = dict(
            folder=str(root / name), cls=type(pipe).__name__, call=call, images=sample(pipe, call)
        )
    model = tiny["mdit"][0].transformer
    model.save_pretrained(root / "model")
    return dict(root=root, pipelines=pipelines, model_output=model_output(model))


@pytest.fixture(scope="module")
def hub() -> FakeHub:
    with FakeHub() as fake_hub:
        yield fake_hub


@pytest.fixture(scope="module")
def pushed(hub: FakeHub, saved: dict, tmp_path_factory) -> dict:
    """The "mdit" and "text" pipelines and the MDiT model pushed to the fake Hub with model
    cards, by a fresh process that loads them from their saved folders."""
    folder = tmp_path_factory.mktemp("push")
    PIL.Image.new("RGB", (16, 8), "blue").save(folder / "grid.jpg")
    pipelines = saved["pipelines"]
    spec = dict(
        pipelines=[
            dict(folder=pipelines[name]["folder"], cls=pipelines[name]["cls"], repo=repo(name))
            for name in ("mdit", "text")
        ],
        model=dict(
            folder=str(saved["root"] / "model"),
            repo=repo("model"),
            sample_grid=str(folder / "grid.jpg"),
        ),
        card=CARD,
        results=str(folder / "results.json"),
    )
    run_jobs("push", spec, folder, hub_env(hub))
    return json.loads((folder / "results.json").read_text())


def repo(name: str) -> str:
    return f"{NAMESPACE}/tiny-{name}"


def hub_env(hub: FakeHub) -> dict[str, str]:
    return dict(HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_TOKEN="hf_test_token")


def load_jobs(saved: dict, sources: dict[str, str], folder: Path) -> list[dict]:
    """Jobs loading each pipeline of ``sources`` (name -> folder or repo) both ways."""
    jobs = []
    for name, source in sources.items():
        cls, call = saved["pipelines"][name]["cls"], saved["pipelines"][name]["call"]
        for loader in ("DiffusionPipeline", cls):
            out = str(folder / f"{name}-{loader}.npy")
            jobs.append(dict(source=source, loader=loader, cls=cls, call=call, out=out, name=name))
    return jobs


def assert_same_images(saved: dict, jobs: list[dict]) -> None:
    for job in jobs:
        expected = saved["pipelines"][job["name"]]["images"]
        np.testing.assert_array_equal(np.load(job["out"]), expected, err_msg=str(job))


# -- saved folders, the diffusers way -----------------------------------------------------------


def test_saved_folder_is_hub_ready(saved):
    folder = Path(saved["pipelines"]["text"]["folder"])
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "MDiTTextToImagePipeline"]
    assert index["transformer"] == ["diffusers_mdit", "MDiTTransformer2DModel"]
    assert index["text_encoder"] == ["transformers", "T5EncoderModel"]
    assert index[VERSION_KEY] == diffusers_mdit.__version__
    code = _resource(HUB_CODE_FILE).read_bytes()
    assert (folder / "pipeline.py").read_bytes() == code
    assert (folder / "transformer" / "diffusers_mdit.py").read_bytes() == code
    assert not (folder / "text_encoder" / "diffusers_mdit.py").exists()
    config = json.loads((folder / "transformer" / "config.json").read_text())
    assert config[VERSION_KEY] == diffusers_mdit.__version__


def test_saved_pipelines_load_both_ways_in_a_fresh_process_with_identical_images(saved, tmp_path):
    sources = {name: info["folder"] for name, info in saved["pipelines"].items()}
    jobs = load_jobs(saved, sources, tmp_path)
    run_jobs("load", jobs, tmp_path)
    assert_same_images(saved, jobs)


# -- the Hub round trip -------------------------------------------------------------------------


def test_pushed_pipelines_and_model_load_back_from_the_hub_identically(
    hub, saved, pushed, tmp_path
):
    # Pickle weights beside the safetensors ones (as old repositories hold) are never fetched.
    pickle = base64.b64encode(b"not unpickled").decode()
    for name, path in (("mdit", "transformer/diffusion_pytorch_model.bin"),
                       ("model", "diffusion_pytorch_model.bin")):  # fmt: skip
        hub.commit(repo(name), [{"key": "file", "value": {"path": path, "content": pickle}}])
    jobs = load_jobs(saved, {name: repo(name) for name in ("mdit", "text")}, tmp_path)
    model_out = str(tmp_path / "model.npy")
    model_class = "MDiTTransformer2DModel"
    jobs.append(dict(source=repo("model"), loader=model_class, cls=model_class, out=model_out))
    run_jobs("load", jobs, tmp_path, hub_env(hub))
    assert_same_images(saved, jobs[:-1])
    np.testing.assert_array_equal(np.load(model_out), saved["model_output"])
    files = hub.files(repo("mdit"))
    assert files["pipeline.py"] == _resource(HUB_CODE_FILE).read_bytes()
    assert files["transformer/diffusers_mdit.py"] == _resource(HUB_CODE_FILE).read_bytes()
    assert hub.unhandled == []  # the client needed no endpoint the fake Hub lacks
    cache = tmp_path / "hf-home"
    assert list(cache.rglob("*.safetensors")) and not list(cache.rglob("*.bin"))


def test_pushed_model_card_carries_architecture_training_samples_citation_license(hub, pushed):
    files = hub.files(repo("mdit"))
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "diffusers"
    assert card.data.license == "apache-2.0"
    assert {"diffusers", "diffusers-mdit", "mdit", "class-conditional", "tiny-test"} <= set(
        card.data.tags
    )
    text = card.text
    parameters = sum(p.numel() for p in tiny_mdit(in_channels=3, num_classes=10).parameters())
    assert "`MDiTPipeline`" in text and "`MDiTTransformer2DModel`" in text
    assert "| Layout {M, N, K, L} | {1, 1, 2, 1} |" in text
    assert f"| Parameters | {parameters:,} " in text
    assert "Training data: ImageNet-1k 256px (test)" in text
    assert "Training steps: 1234" in text
    assert "![Sample grid](sample_grid.png)" in text and "sample_grid.png" in files
    assert "Multi-Scale Image Diffusion Transformers: Explainability Leads to Faster" in text
    assert 'DiffusionPipeline.from_pretrained("test-user/tiny-mdit", trust_remote_code=True)' in (
        text
    )
    assert "sample_grid.jpg" in hub.files(repo("model"))
    via_save = hub.files(repo("model-via-save"))  # save_pretrained(push_to_hub=True)
    assert "library_name: diffusers" in via_save["README.md"].decode()
    assert VERSION_KEY in json.loads(via_save["config.json"])
    text_card = ModelCard(hub.files(repo("text"))["README.md"].decode())
    assert text_card.data.pipeline_tag == "text-to-image"


def test_push_never_overwrites_an_existing_readme_silently(pushed):
    assert "already has a README.md" in pushed["default"]
    assert "existing_model_card='overwrite'" in pushed["default"]
    assert pushed["after_keep"] == "# My notes\n"
    assert "library_name: diffusers" in pushed["after_overwrite"]


def test_push_refuses_a_misspelt_card_argument_before_creating_the_repository():
    # No Hub here: reaching create_repo would fail with a connection or offline error instead.
    with pytest.raises(TypeError, match="trainig_data"):
        tiny_mdit().push_to_hub(repo("misspelt"), trainig_data="ImageNet")


def test_mdit_card_lists_the_settings_that_change_the_architecture():
    default = create_model_card(tiny_mdit(num_classes=4)).text
    assert "| `class_conditioning` | cross_attention |" in default
    assert "core_kernel_sizes" not in default and "cross_attention_dim" not in default
    model = tiny_mdit(num_classes=4, core_kernel_sizes=[3, None, None])
    assert "| `core_kernel_sizes` | [3, None, None] |" in create_model_card(model).text


def test_diffit_card_defaults_to_unknown_and_cites_diffit(saved):
    pipe = DiffiTPipeline.from_pretrained(saved["pipelines"]["diffit"]["folder"])
    card = create_model_card(pipe)
    assert card.data.license == "unknown"
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert "diffit" in card.data.tags and "Layout" not in card.text
    assert "Training data: unknown" in card.text and "Training steps: unknown" in card.text
    assert "No sample grid" in card.text
    assert "DiffiT: Diffusion Vision Transformers for Image Generation" in card.text
    assert "arXiv:2312.02139" in card.text and "Hatamizadeh" in card.text


# -- loading checks -----------------------------------------------------------------------------


@pytest.fixture
def model_folder(saved, tmp_path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(saved["root"] / "model", folder)
    return folder


@pytest.fixture
def pipeline_folder(saved, tmp_path) -> Path:
    folder = tmp_path / "pipeline"
    shutil.copytree(saved["pipelines"]["mdit"]["folder"], folder)
    return folder


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# diffusers' own messages from here on (we force use_safetensors=True): each names the file.


def test_missing_weights_name_the_file_and_the_folder(model_folder):
    (model_folder / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(OSError, match="no file named diffusion_pytorch_model.safetensors found in"):
        MDiTTransformer2DModel.from_pretrained(model_folder)


def test_a_missing_shard_is_named(tmp_path):
    model = randomize(tiny_mdit(num_classes=10), 1)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(tmp_path, max_shard_size=size // 3)
    shards = sorted(tmp_path.glob("*-of-*.safetensors"))
    assert len(shards) > 1
    assert torch.equal(
        *(m.proj_in.weight for m in (model, MDiTTransformer2DModel.from_pretrained(tmp_path)))
    )
    shards[-1].unlink()
    with pytest.raises(OSError, match=f"does not appear to have a file named .*{shards[-1].name}"):
        MDiTTransformer2DModel.from_pretrained(tmp_path)


def test_corrupt_weights_are_refused(model_folder):
    weights = model_folder / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(OSError, match=f"Unable to load weights from checkpoint file .*{weights}"):
        MDiTTransformer2DModel.from_pretrained(model_folder)
    weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    with pytest.raises(OSError, match="git-lfs"):
        MDiTTransformer2DModel.from_pretrained(model_folder)


class _Payload:
    """Unpickling this writes a marker file: the proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_weights_are_refused_unread(model_folder, tmp_path):
    weights = model_folder / "diffusion_pytorch_model.safetensors"
    marker = tmp_path / "code-ran"
    torch.save(_Payload(marker), model_folder / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="use_safetensors=False is not supported"):
        MDiTTransformer2DModel.from_pretrained(model_folder, use_safetensors=False)
    weights.unlink()
    with pytest.raises(OSError, match="no file named diffusion_pytorch_model.safetensors"):
        MDiTTransformer2DModel.from_pretrained(model_folder)
    with pytest.raises(OSError, match="no file named diffusion_pytorch_model.safetensors"):
        MDiTTransformer2DModel.from_pretrained(model_folder.parent, subfolder="model")
    assert not marker.exists()
    with pytest.raises(ValueError, match="safe_serialization=False is not supported"):
        tiny_mdit().save_pretrained(model_folder, safe_serialization=False)


def test_corrupt_config_and_configs_from_a_newer_or_unknown_version(model_folder):
    config = model_folder / "config.json"
    original = config.read_text()
    edit_json(config, **{VERSION_KEY: "99.0.0"})
    with pytest.raises(ValueError, match="saved by diffusers-mdit 99.0.0, newer than .*upgrade"):
        MDiTTransformer2DModel.from_pretrained(model_folder)
    config.write_text(original)
    edit_json(config, _class_name="MDiTTransformer3DModel")
    with pytest.raises(ValueError, match="'MDiTTransformer3DModel', which diffusers-mdit"):
        MDiTTransformer2DModel.from_pretrained(model_folder)
    config.write_text(original)
    with pytest.raises(ValueError, match="holds a MDiTTransformer2DModel.*MDiTTransformer2DModel"):
        DiffiTUNet2DModel.from_pretrained(model_folder)
    config.write_text(original[:-20])
    with pytest.raises(OSError, match="config.json' is not a valid JSON file"):
        MDiTTransformer2DModel.from_pretrained(model_folder)


def test_pipeline_checks_version_class_weights_and_code_files(pipeline_folder):
    index = pipeline_folder / "model_index.json"
    original = index.read_text()
    edit_json(index, **{VERSION_KEY: "99.0.0"})
    with pytest.raises(ValueError, match="newer than the installed"):
        MDiTPipeline.from_pretrained(pipeline_folder)
    edit_json(index, **{VERSION_KEY: diffusers_mdit.__version__, "_class_name": ["pipeline", "X"]})
    with pytest.raises(ValueError, match="names the class 'X'"):
        MDiTPipeline.from_pretrained(pipeline_folder)
    # The diffusers way reaches the class through the code file, which says what is wrong.
    with pytest.raises(AttributeError, match="has no class 'X'.*newer diffusers-mdit"):
        DiffusionPipeline.from_pretrained(pipeline_folder, trust_remote_code=True)
    index.write_text(original)
    with pytest.raises(ValueError, match="holds a MDiTPipeline"):
        DiffiTPipeline.from_pretrained(pipeline_folder)

    code = pipeline_folder / "transformer" / "diffusers_mdit.py"
    code.write_text(code.read_text() + "\nprint('not the package code')\n")
    with pytest.raises(ValueError, match=r"code files .*\(transformer/diffusers_mdit.py\)"):
        MDiTPipeline.from_pretrained(pipeline_folder)
    (pipeline_folder / "None.py").write_text("raise SystemExit\n")  # diffusers would run it
    with pytest.raises(ValueError, match=r"code files .*\(None.py, transformer/diffusers_mdit"):
        MDiTPipeline.from_pretrained(pipeline_folder)
    (pipeline_folder / "None.py").unlink()
    assert type(MDiTPipeline.from_pretrained(pipeline_folder, trust_remote_code=True)) is (
        MDiTPipeline
    )
    shutil.copyfile(_resource(HUB_CODE_FILE), code)
    (pipeline_folder / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(OSError, match="no file named diffusion_pytorch_model.safetensors .*former"):
        MDiTPipeline.from_pretrained(pipeline_folder)
