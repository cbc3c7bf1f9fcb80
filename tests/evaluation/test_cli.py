"""``mdit-eval generate`` and ``mdit-eval score`` end to end on a tiny saved pipeline."""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import PIL.Image
import pytest

from diffusers_mdit import MDiTPipeline
from diffusers_mdit.evaluation.cli import main
from diffusers_mdit.testing import ddim_x0, tiny_mdit


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipeline")
    pipe = MDiTPipeline(transformer=tiny_mdit(in_channels=3, num_classes=10), scheduler=ddim_x0())
    pipe.save_pretrained(path)
    return str(path)


def test_generate_then_score_against_the_digits(pipeline_dir, tmp_path, capsys):
    samples = str(tmp_path / "samples")
    argv = ["generate", pipeline_dir, "--output_dir", samples, "--num_samples", "20"]
    assert main([*argv, "--batch_size", "8", "--num_inference_steps", "2", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["num_generated"] == 20
    assert len([n for n in os.listdir(samples) if n.endswith(".png")]) == 20

    output = str(tmp_path / "scores" / "digits.json")
    argv = ["score", samples, "--metrics", "fd_classifier,accuracy", "--output", output]
    assert main([*argv, "--device", "cpu"]) == 0
    with open(output) as f:
        report = json.load(f)
    assert report == json.loads(capsys.readouterr().out)
    assert report["num_samples"] == 20 and report["num_reference"] == 1797
    scores = report["metrics"]
    assert scores["classifier_heldout_accuracy"] >= 0.95
    assert 0.0 <= scores["accuracy"] <= 1.0
    assert math.isfinite(scores["fd_classifier"]) and scores["fd_classifier"] > 0


def write_squares(folder, colours, per_colour, labels_in_metadata, seed=0):
    """Noisy single-colour 8x8 squares, class = colour."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    rows = []
    for label, colour in enumerate(colours):
        for i in range(per_colour):
            pixels = np.clip(np.array(colour) + rng.normal(0, 20, (8, 8, 3)), 0, 255)
            name = f"{label}_{i}.png"
            if labels_in_metadata:
                rows.append({"file_name": name, "label": label})
                path = os.path.join(folder, name)
            else:
                os.makedirs(os.path.join(folder, str(label)), exist_ok=True)
                path = os.path.join(folder, str(label), name)
            PIL.Image.fromarray(pixels.astype(np.uint8)).save(path)
    if rows:
        with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


def test_score_against_a_labelled_folder_of_real_images(tmp_path, capsys):
    colours = [(200, 30, 30), (30, 30, 200)]
    write_squares(tmp_path / "real", colours, 40, labels_in_metadata=False)  # class folders
    write_squares(tmp_path / "good", colours, 5, labels_in_metadata=True, seed=1)
    write_squares(tmp_path / "swapped", colours[::-1], 5, labels_in_metadata=True, seed=2)
    write_squares(tmp_path / "green", [(30, 200, 30)] * 2, 5, labels_in_metadata=True, seed=3)

    def score(samples):
        argv = ["score", str(tmp_path / samples), "--reference", str(tmp_path / "real")]
        assert main(argv) == 0
        return json.loads(capsys.readouterr().out)["metrics"]

    good, swapped, green = score("good"), score("swapped"), score("green")
    assert good["classifier_heldout_accuracy"] == 1.0
    assert good["accuracy"] == 1.0 and swapped["accuracy"] == 0.0
    # Unlike accuracy, the distance ignores labels; a colour absent from the reference is far.
    assert green["fd_classifier"] > 10 * max(good["fd_classifier"], swapped["fd_classifier"])


def test_unavailable_metric_exits_with_the_message(pipeline_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    write_squares(tmp_path / "samples", [(0, 0, 0)], 3, labels_in_metadata=True)
    assert main(["score", str(tmp_path / "samples"), "--metrics", "fid,is"]) == 2
    error = capsys.readouterr().err
    assert "mdit-eval score: error: fid, is unavailable: torch-fidelity" in error
    assert "diffusers-mdit[metrics]" in error


def test_unknown_metric_is_a_clear_error(tmp_path, capsys):
    write_squares(tmp_path / "samples", [(0, 0, 0)], 3, labels_in_metadata=True)
    assert main(["score", str(tmp_path / "samples"), "--metrics", "fid,kid"]) == 2
    assert "Unknown metrics ['kid']" in capsys.readouterr().err
