"""A built wheel carries the Hub code file and the model card template."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_ships_the_hub_files(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("diffusers_mdit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "diffusers_mdit/hub_files/pipeline.py" in names
    assert "diffusers_mdit/model_cards/model_card_template.md" in names
    packaged = zipfile.ZipFile(wheel).read("diffusers_mdit/hub_files/pipeline.py")
    assert packaged == (ROOT / "pipelines" / "pipeline.py").read_bytes()
