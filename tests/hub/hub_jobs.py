"""What the Hub tests run in fresh processes: ``python hub_jobs.py {load|push} <spec.json>``.

A fresh process has imported nothing of ours, so ``DiffusionPipeline.from_pretrained(...,
trust_remote_code=True)`` must find every class through the saved files alone (``load`` asserts
that ``diffusers_mdit`` is not imported before), and ``HF_ENDPOINT`` (read when huggingface_hub
is imported) points the real huggingface_hub client at the test's fake Hub. The tests import
:func:`sample` and :func:`model_output` too, so references and reloads run the same code.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch


def sample(pipe, call: dict) -> np.ndarray:
    """Two steps of ``pipe`` with seed 0, as a float array."""
    generator = torch.Generator().manual_seed(0)
    return pipe(**call, num_inference_steps=2, generator=generator, output_type="np").images


def model_output(model) -> np.ndarray:
    """A class-conditional 3-channel 8x8 model's prediction for a fixed input."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=generator)
    with torch.no_grad():
        return model(x, torch.tensor([10, 700]), class_labels=torch.tensor([1, 4])).sample.numpy()


def load(jobs: list[dict]) -> None:
    """Each job: load ``source`` with ``loader`` (``"DiffusionPipeline"``, with
    ``trust_remote_code=True``, or a class name of diffusers_mdit), check that it made a ``cls``,
    save the images of ``call`` (or the model's output when there is no ``call``) to ``out``."""
    from diffusers import DiffusionPipeline

    assert "diffusers_mdit" not in sys.modules, "the saved code files must import diffusers_mdit"
    for job in jobs:
        if job["loader"] == "DiffusionPipeline":
            loaded = DiffusionPipeline.from_pretrained(job["source"], trust_remote_code=True)
        else:
            import diffusers_mdit

            loaded = getattr(diffusers_mdit, job["loader"]).from_pretrained(job["source"])
        assert type(loaded).__name__ == job["cls"], f"{job['source']}: {type(loaded)}"
        output = sample(loaded, job["call"]) if "call" in job else model_output(loaded)
        np.save(job["out"], output)


def push(spec: dict) -> None:
    """Push the saved pipelines and the model of ``spec`` with model cards, then check that a
    README already in the repository is replaced only on request (results to ``results``)."""
    import PIL.Image
    from huggingface_hub import HfApi, hf_hub_download

    import diffusers_mdit

    card = spec["card"]
    for job in spec["pipelines"]:
        pipe = getattr(diffusers_mdit, job["cls"]).from_pretrained(job["folder"])
        pipe.push_to_hub(job["repo"], sample_grid=PIL.Image.new("RGB", (16, 8), "red"), **card)
    model = diffusers_mdit.MDiTTransformer2DModel.from_pretrained(spec["model"]["folder"])
    repo = spec["model"]["repo"]
    model.push_to_hub(repo, sample_grid=spec["model"]["sample_grid"], **card)
    model.save_pretrained("via-save", push_to_hub=True, repo_id=f"{repo}-via-save")

    results = {}
    HfApi().upload_file(path_or_fileobj=b"# My notes\n", path_in_repo="README.md", repo_id=repo)
    try:
        model.push_to_hub(repo)
        results["default"] = "pushed"
    except FileExistsError as error:
        results["default"] = str(error)
    model.push_to_hub(repo, existing_model_card="keep")
    results["after_keep"] = open(hf_hub_download(repo, "README.md")).read()
    model.push_to_hub(repo, existing_model_card="overwrite")
    results["after_overwrite"] = open(hf_hub_download(repo, "README.md")).read()
    with open(spec["results"], "w") as file:
        json.dump(results, file)


if __name__ == "__main__":
    with open(sys.argv[2]) as spec_file:
        {"load": load, "push": push}[sys.argv[1]](json.load(spec_file))
