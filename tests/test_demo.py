"""The main job (``./run.sh demo``): train on the digits, reload, sample, score."""

from __future__ import annotations

import re

import PIL.Image
import pytest

from diffusers_mdit.demo import main


def test_shortened_demo_trains_reloads_writes_grid_and_prints_accuracy(tmp_path, capsys):
    result = main(
        ["--output_dir", str(tmp_path), "--max_train_steps", "4", "--train_batch_size", "8",
         "--samples_per_class", "2", "--num_inference_steps", "3"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert result.steps == 4
    assert (tmp_path / "model_index.json").is_file()
    assert (tmp_path / "checkpoint-4").is_dir()
    grid = PIL.Image.open(result.grid_path)
    assert grid.height >= 10 * 16  # one row per digit
    assert 0.0 <= result.accuracy <= 1.0 and len(result.per_class_accuracy) == 10
    match = re.search(r"recognises the intended digit in ([\d.]+)% of the 20 samples", out)
    assert match and float(match.group(1)) == pytest.approx(100 * result.accuracy, abs=0.05)

    # Started again, the demo resumes from the finished run's checkpoint instead of retraining.
    again = main(
        ["--output_dir", str(tmp_path), "--max_train_steps", "4", "--train_batch_size", "8",
         "--samples_per_class", "2", "--num_inference_steps", "3"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "Resumed from" in out and "had already finished 4 steps" in out
    assert again.accuracy == result.accuracy


@pytest.mark.slow
def test_default_demo_draws_recognisable_digits(tmp_path):
    """The full demo as ``./run.sh demo`` runs it (a few minutes on 2 CPU cores)."""
    result = main(["--output_dir", str(tmp_path)])
    assert result.accuracy >= 0.9, result
