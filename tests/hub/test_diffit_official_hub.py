"""The official-DiffiT route through a Hub (the fake one of fake_hub.py, driven by the real
huggingface_hub client): ``convert_diffit_to_diffusers.py`` downloads the checkpoint by
``<owner>/<repo>/<file>`` (``from_single_file`` -> ``hf_hub_download``) and pushes the folder."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

from fake_hub import NAMESPACE, FakeHub
from safetensors.torch import load_file, save

from diffusers_mdit.testing import tiny_vae

ROOT = Path(__file__).parents[2]
FIXTURE = ROOT / "tests" / "models" / "fixtures" / "diffit_official_tiny.safetensors"


def test_convert_script_downloads_the_checkpoint_and_pushes_the_pipeline(tmp_path):
    state = {k[len("official.") :]: v for k, v in load_file(FIXTURE).items() if "official." in k}
    source, target = f"{NAMESPACE}/DiffiT", f"{NAMESPACE}/diffit-converted"
    tiny_vae().save_pretrained(tmp_path / "vae")
    with FakeHub() as hub:
        hub.create_repo(source)
        content = base64.b64encode(save(state)).decode()
        hub.commit(source, [{"key": "file", "value": {"path": "diffit_tiny.safetensors",
                                                        "content": content}}])  # fmt: skip
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0",
               "HF_TOKEN": "hf_test_token", "HF_HOME": str(tmp_path / "hf")}  # fmt: skip
        result = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "convert_diffit_to_diffusers.py"),
             "--checkpoint_path", f"{source}/diffit_tiny.safetensors",
             "--vae_model_name_or_path", str(tmp_path / "vae"),
             "--output_dir", str(tmp_path / "out"), "--push_to_hub", "--hub_model_id", target],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        files = hub.files(target)
        assert not hub.unhandled, hub.unhandled
    for path in ("model_index.json", "pipeline.py", "scheduler/scheduler_config.json",
                 "transformer/diffusion_pytorch_model.safetensors", "vae/config.json"):  # fmt: skip
        assert path in files, sorted(files)
    card = files["README.md"].decode()
    assert "license: cc-by-nc-sa-4.0" in card and f'from_pretrained("{target}")' in card
    assert (tmp_path / "hf").is_dir()  # the checkpoint went through huggingface_hub's cache
