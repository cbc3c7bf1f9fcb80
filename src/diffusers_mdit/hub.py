"""Saving, loading and pushing to the Hub: only what diffusers 0.42 leaves to us.

diffusers and huggingface_hub do the rest. ``use_safetensors=True`` (forced here) refuses pickle
weights and never downloads them; ``ModelMixin.from_pretrained`` downloads a model and names
missing, broken and Git LFS pointer files; its ``output_loading_info`` lists missing, unknown and
mis-shaped tensors; ``PushToHubMixin`` uploads and ``populate_model_card`` tags the card.
What is ours, each for a reason diffusers lacks:

- The Hub code file. diffusers resolves a pipeline class only among its own
  (``getattr(diffusers, model_index["_class_name"])``) and a component library other than
  diffusers/transformers only through a ``<component>/<library>.py`` file. So a saved folder has
  ``"_class_name": ["pipeline", "<PipelineClass>"]``, components of the library
  ``"diffusers_mdit"``, and ``pipeline.py`` and ``<component>/diffusers_mdit.py``: copies of
  ``pipelines/pipeline.py``, which hands out the installed package's classes. diffusers runs them
  only with ``trust_remote_code=True``; our own classes load without it when every code file is
  byte for byte the installed package's.
- The version stamp ``_diffusers_mdit_version`` in ``model_index.json`` and in every model's
  ``config.json``, and the refusal of a config saved by a newer diffusers-mdit or naming a class
  the package lacks: diffusers loads any config into any class and drops fields it does not know.
- The refusal of missing, unknown and mis-shaped tensors: diffusers only warns, leaving missing
  tensors randomly initialised or on the meta device.
- The model card template, and a push that never replaces an existing README silently
  (diffusers' ``push_to_hub`` keeps it but rewrites its metadata).

The code file and the card template live in the repository folders ``pipelines/`` and
``model_cards/`` (next to ``src/``) and ship in wheels as ``diffusers_mdit.hub_files`` and
``diffusers_mdit.model_cards`` (see pyproject.toml).
"""

from __future__ import annotations

import importlib.resources
import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal, TypeVar

import PIL.Image
import torch
from diffusers import DiffusionPipeline, ModelMixin
from diffusers.utils.hub_utils import populate_model_card
from huggingface_hub import ModelCard, ModelCardData, create_repo, file_exists, snapshot_download
from packaging.version import InvalidVersion, Version

from .families import FAMILIES

HUB_CODE_FILE = ("diffusers_mdit.hub_files", "pipelines", "pipeline.py")
MODEL_CARD_TEMPLATE = ("diffusers_mdit.model_cards", "model_cards", "model_card_template.md")

LIBRARY_NAME = "diffusers_mdit"
VERSION_KEY = "_diffusers_mdit_version"
PIPELINE_CODE_NAME = "pipeline"  # model_index.json: "_class_name": ["pipeline", "<Class>"]
COMPONENT_CODE_FILE = f"{LIBRARY_NAME}.py"  # <component>/diffusers_mdit.py
SAMPLE_GRID_NAME = "sample_grid"
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle"]
UPGRADE_HINT = "upgrade the package (pip install -U diffusers-mdit)"
SAFETENSORS_ONLY = (
    "diffusers-mdit saves and loads weights as safetensors only, because unpickling a weight "
    "file can run arbitrary code."
)
_SNAPSHOT_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision")
_PUSH_KWARGS = ("commit_message", "private", "token", "create_pr", "repo_id")

ExistingModelCard = Literal["error", "keep", "overwrite"]
ModelT = TypeVar("ModelT", bound="HubModelMixin")
PipelineT = TypeVar("PipelineT", bound="HubPipelineMixin")


# -- package facts ----------------------------------------------------------------------------


def installed_version() -> str:
    """Version of the installed diffusers-mdit."""
    from .version import __version__

    return __version__


def known_classes(base: type) -> dict[str, type]:
    """Public classes of the package that derive from ``base`` (models or pipelines)."""
    import diffusers_mdit

    return {
        name: value
        for name in diffusers_mdit.__all__
        if isinstance(value := getattr(diffusers_mdit, name), type) and issubclass(value, base)
    }


def _resource(location: tuple[str, str, str]) -> Path:
    """A data file: in the repository folder of a source checkout (editable installs), else
    in the installed package."""
    package, folder, name = location
    path = Path(__file__).resolve().parents[2] / folder / name
    if not path.is_file():
        try:
            path = Path(str(importlib.resources.files(package) / name))
        except ModuleNotFoundError:
            pass
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder}/{name} is missing from this diffusers-mdit installation; reinstall the "
            "package (pip install --force-reinstall diffusers-mdit) or use a source checkout."
        )
    return path


# -- checks -----------------------------------------------------------------------------------


def check_config(config: dict[str, Any], expected: type, base: type, path: str | Path) -> None:
    """Refuse a config (``config.json`` or ``model_index.json``) saved by a newer diffusers-mdit,
    whose fields or semantics this version may not know, or naming a class that the package
    lacks or that is not ``expected``: diffusers would load it anyway, and fail late or wrong."""
    saved = config.get(VERSION_KEY)
    if saved is not None:
        try:
            newer = Version(str(saved)) > Version(installed_version())
        except InvalidVersion as error:
            raise ValueError(f"{path}: unreadable {VERSION_KEY} {saved!r}.") from error
        if newer:
            raise ValueError(
                f"{path} was saved by diffusers-mdit {saved}, newer than the installed "
                f"{installed_version()}: {UPGRADE_HINT} to load it."
            )
    name, known = _class_name(config), known_classes(base)
    if name not in known:
        raise ValueError(
            f"{path} names the class {name!r}, which diffusers-mdit {installed_version()} does "
            f"not define (it defines {', '.join(known)}). If a newer diffusers-mdit saved it, "
            f"{UPGRADE_HINT}; otherwise load it with the library that saved it."
        )
    if not issubclass(known[name], expected):
        raise ValueError(
            f"{path} holds a {name}, not a {expected.__name__}: load it with "
            f"{name}.from_pretrained."
        )


def check_tensors(model: torch.nn.Module, loading_info: dict[str, Any], source: str) -> None:
    """Refuse weights that miss tensors of ``model``, hold unknown ones or ones of other shapes
    (``loading_info``: ``ModelMixin.from_pretrained(..., output_loading_info=True)``'s)."""
    mismatched = sorted(loading_info.get("mismatched_keys", ()))
    problems = {
        "missing": sorted(loading_info.get("missing_keys", ())),
        "unknown": sorted(loading_info.get("unexpected_keys", ())),
        "mis-shaped": [f"{k} {tuple(s)} (expected {tuple(e)})" for k, s, e in mismatched],
    }
    listed = [
        f"{label} ({len(names)}): {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"
        for label, names in problems.items()
        if names
    ]
    if listed:
        raise ValueError(
            f"The weights in {source} do not match {type(model).__name__}'s config: "
            f"{'; '.join(listed)}. The file is incomplete or belongs to another config: save "
            "the model again, or download it again with force_download=True."
        )


def _refuse_pickle(kwargs: dict[str, Any]) -> None:
    """Loading: force ``use_safetensors=True``; refuse an explicit request for pickle."""
    if kwargs.get("use_safetensors") is False:
        raise ValueError(f"use_safetensors=False is not supported. {SAFETENSORS_ONLY}")
    kwargs["use_safetensors"] = True


def _refuse_pickle_save(safe_serialization: bool) -> None:
    if not safe_serialization:
        raise ValueError(f"safe_serialization=False is not supported. {SAFETENSORS_ONLY}")


def _own_weights(model: torch.nn.Module) -> None:
    """Give every CPU parameter and buffer memory of its own: diffusers leaves them views of the
    memory-mapped file (with ``disable_mmap``, of a read buffer per tensor). Their odd alignment
    makes CPU kernels take other code paths (outputs differ from the saved model's in the last
    bit), and a mapped model would change or crash if its file were rewritten (saved over)."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type == "cpu":
                tensor.data = tensor.data.clone()


# -- saved pipeline folders -------------------------------------------------------------------


def _class_name(config: dict[str, Any]) -> Any:
    name = config.get("_class_name")
    return name[1] if isinstance(name, list) and len(name) == 2 else name


def _is_component(name: str, value: Any) -> bool:
    return not name.startswith("_") and isinstance(value, list) and len(value) == 2


def write_pipeline_hub_files(folder: Path) -> None:
    """Make a folder written by ``DiffusionPipeline.save_pretrained`` loadable with
    ``DiffusionPipeline.from_pretrained(folder_or_repo, trust_remote_code=True)``: list-form
    ``_class_name``, the library ``"diffusers_mdit"`` for our components, the code files and
    the version."""
    code = _resource(HUB_CODE_FILE)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    index["_class_name"] = [PIPELINE_CODE_NAME, _class_name(index)]
    index[VERSION_KEY] = installed_version()
    for name, value in index.items():
        if _is_component(name, value) and str(value[0]).split(".")[0] == LIBRARY_NAME:
            index[name] = [LIBRARY_NAME, value[1]]
            shutil.copyfile(code, folder / name / COMPONENT_CODE_FILE)
    shutil.copyfile(code, folder / f"{PIPELINE_CODE_NAME}.py")
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def code_files(folder: Path, index: dict[str, Any]) -> list[str]:
    """Code files of ``folder`` that diffusers 0.42 would import when loading it: the pipeline
    file named by a list-form ``_class_name``, ``<component>/<library>.py`` of every component,
    and ``None.py`` (``_resolve_custom_pipeline_and_cls`` looks for ``f"{custom_pipeline}.py"``
    even when ``custom_pipeline`` is None)."""
    candidates = ["None.py"]
    class_name = index.get("_class_name")
    if isinstance(class_name, list) and class_name:
        candidates.append(f"{class_name[0]}.py")
    for name, value in index.items():
        if _is_component(name, value) and value[0]:
            candidates.append(f"{name}/{value[0]}.py")
    return [name for name in candidates if (folder / name).is_file()]


# -- model cards ------------------------------------------------------------------------------


def mdit_layout(config: Any) -> str:
    """The paper's ``{M, N, K, L}`` notation for an MDiT config."""
    blocks = (
        config.num_outer_in_blocks,
        config.num_outer_out_blocks,
        config.num_alternating_blocks,
        config.num_core_blocks,
    )
    return "{" + ", ".join(map(str, blocks)) + "}"


def _format_count(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count:,} ({count / size:.1f}{unit})"
    return f"{count:,}"


def create_model_card(
    obj: ModelMixin | DiffusionPipeline,
    repo_id: str | None = None,
    training_data: str = "unknown",
    training_steps: int | str = "unknown",
    sample_grid: str | None = None,
    license: str = "unknown",
    tags: list[str] | None = None,
    datasets: list[str] | None = None,
) -> ModelCard:
    """Model card of one of our models or pipelines, from ``model_cards/model_card_template.md``
    (diffusers' ``load_or_create_model_card`` has only its generic template).

    The card states what a user needs to judge and load the weights: the architecture (MDiT's
    ``{M, N, K, L}``), the parameter count, the training data and steps (``"unknown"`` unless
    given: the weights do not record them), the sample grid when one is uploaded (its file name
    in the repository, ``sample_grid``), the papers to cite, the license, and (through
    diffusers' ``populate_model_card``) ``library_name: diffusers`` with tags.
    """
    is_pipeline = isinstance(obj, DiffusionPipeline)
    model = obj.transformer if is_pipeline else obj
    model_class = type(model).__name__
    if model_class not in FAMILIES:
        raise ValueError(f"No model card for {model_class}: not a model of diffusers-mdit.")
    family = FAMILIES[model_class]
    config = model.config
    if getattr(config, "cross_attention_dim", None):
        conditioning, pipeline_tag = "text-to-image", "text-to-image"
    elif config.num_classes:
        conditioning, pipeline_tag = "class-conditional", None
    else:
        conditioning, pipeline_tag = "unconditional", "unconditional-image-generation"
    components = {}
    if is_pipeline:
        components = {k: type(v).__name__ for k, v in obj.components.items() if v is not None}
    card = ModelCard.from_template(
        ModelCardData(license=license, pipeline_tag=pipeline_tag, datasets=datasets),
        template_path=str(_resource(MODEL_CARD_TEMPLATE)),
        repo_id=repo_id or f"<your {'pipeline' if is_pipeline else 'model'} repo>",
        is_pipeline=is_pipeline,
        class_name=type(obj).__name__,
        model_class=model_class,
        architecture=family.architecture,
        layout=mdit_layout(config) if model_class == "MDiTTransformer2DModel" else None,
        config_summary={  # settings left at None (e.g. no per-block kernels) are not listed
            key: config[key] for key in family.config_summary if config.get(key) is not None
        },
        parameters=_format_count(sum(p.numel() for p in model.parameters())),
        components=components,
        conditioning=conditioning,
        training_data=training_data,
        training_steps=training_steps,
        sample_grid=sample_grid,
        citation=family.citation,
        version=installed_version(),
    )
    tags = ["diffusers", "diffusers-mdit", family.tag, conditioning, *(tags or ())]
    return populate_model_card(card, tags=list(dict.fromkeys(tags)))


# -- pushing ----------------------------------------------------------------------------------


class _HubPushMixin:
    """``push_to_hub`` with our model card, shared by models and pipelines."""

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        variant: str | None = None,
        *,
        sample_grid: PIL.Image.Image | str | os.PathLike | None = None,
        existing_model_card: ExistingModelCard = "error",
        **card: Any,
    ) -> str:
        """diffusers' ``push_to_hub`` (save to a temporary folder, upload it to ``repo_id``,
        created if needed, in one commit) with our model card.

        Args:
            sample_grid: Image (PIL or file) uploaded as ``sample_grid.<ext>`` and shown in the
                card.
            existing_model_card: What to do when the repository already has a README.md:
                ``"error"`` (default) refuses to push, ``"keep"`` pushes without a card and
                leaves the README as it is, ``"overwrite"`` replaces it with the generated card.
            card: ``training_data``, ``training_steps``, ``license``, ``tags``, ``datasets``
                of :func:`create_model_card`.

        Returns:
            The URL of the commit.
        """
        _refuse_pickle_save(safe_serialization)
        inspect.signature(create_model_card).bind(self, **card)  # misspelt arguments fail first
        repo_id, write_card = _create_repo(repo_id, private, token, existing_model_card)
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, variant=variant)
            if sample_grid is not None:
                card["sample_grid"] = _save_sample_grid(sample_grid, Path(folder))
            upload = dict(token=token, commit_message=commit_message, create_pr=create_pr)
            return self._upload_with_card(Path(folder), repo_id, write_card, card, upload)

    def _upload_with_card(
        self, folder: Path, repo_id: str, write_card: bool, card: dict, upload: dict
    ) -> str:
        if write_card:
            create_model_card(self, repo_id=repo_id, **card).save(folder / "README.md")
        return self._upload_folder(folder, repo_id, **upload)

    def _push_saved(self, save_directory: str | os.PathLike, push: dict[str, Any]) -> None:
        """``save_pretrained(..., push_to_hub=True)``: upload the saved folder with our card and
        README rules (diffusers' own path writes its generic card)."""
        repo_id = push.pop("repo_id", Path(save_directory).name)
        repo_id, write_card = _create_repo(repo_id, push.pop("private", None), push.get("token"))
        self._upload_with_card(Path(save_directory), repo_id, write_card, {}, push)


def _create_repo(
    repo_id: str, private: bool | None, token: str | None, existing: ExistingModelCard = "error"
) -> tuple[str, bool]:
    """Create ``repo_id`` if needed; its full id, and whether to write our card (a README in the
    repository is replaced only when ``existing`` is ``"overwrite"``, refused on ``"error"``)."""
    if existing not in ("error", "keep", "overwrite"):
        raise ValueError(
            f"existing_model_card must be 'error', 'keep' or 'overwrite', got {existing!r}."
        )
    repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    has_readme = file_exists(repo_id, "README.md", token=token)
    if has_readme and existing == "error":
        raise FileExistsError(
            f"{repo_id} already has a README.md, which push_to_hub does not replace silently. "
            "Pass existing_model_card='keep' to push without touching it, or "
            "existing_model_card='overwrite' to replace it with the generated model card."
        )
    return repo_id, not has_readme or existing == "overwrite"


def _save_sample_grid(image: PIL.Image.Image | str | os.PathLike, folder: Path) -> str:
    if isinstance(image, PIL.Image.Image):
        name = f"{SAMPLE_GRID_NAME}.png"
        image.save(folder / name)
    else:
        name = SAMPLE_GRID_NAME + Path(image).suffix.lower()
        shutil.copyfile(image, folder / name)
    return name


# -- mixins -----------------------------------------------------------------------------------


class HubModelMixin(_HubPushMixin):
    """For the models of the package (before ``ModelMixin`` in the bases): checked loading,
    versioned safetensors-only saving, ``push_to_hub`` with a model card."""

    @classmethod
    def load_config(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
        """``ConfigMixin.load_config`` (which ``from_pretrained`` calls), then the class and the
        version of the config checked (:func:`check_config`)."""
        loaded = super().load_config(pretrained_model_name_or_path, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        path = Path(pretrained_model_name_or_path, kwargs.get("subfolder") or "", "config.json")
        check_config(config, cls, ModelMixin, path)
        return loaded

    @classmethod
    def from_pretrained(
        cls: type[ModelT], pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
    ) -> ModelT:
        """``ModelMixin.from_pretrained`` with safetensors forced, the config checked
        (:meth:`load_config`) and every tensor (:func:`check_tensors`)."""
        _refuse_pickle(kwargs)
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(
            pretrained_model_name_or_path, output_loading_info=True, **kwargs
        )
        check_tensors(model, info, str(pretrained_model_name_or_path))
        if kwargs.get("device_map") is None:
            _own_weights(model)
        return (model, info) if output_loading_info else model

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str = "10GB",
        push_to_hub: bool = False,
        **kwargs: Any,
    ) -> None:
        """``ModelMixin.save_pretrained`` (safetensors only) with the package version in
        ``config.json``; ``push_to_hub=True`` pushes with our card. ``variant`` and
        ``max_shard_size`` are named because ``DiffusionPipeline.save_pretrained`` passes them
        only to save methods whose signature has them."""
        _refuse_pickle_save(safe_serialization)
        self.register_to_config(**{VERSION_KEY: installed_version()})
        push = {key: kwargs.pop(key) for key in _PUSH_KWARGS if key in kwargs}
        super().save_pretrained(
            save_directory,
            is_main_process=is_main_process,
            variant=variant,
            max_shard_size=max_shard_size,
            **kwargs,
        )
        if push_to_hub and is_main_process:
            self._push_saved(save_directory, push)


class HubPipelineMixin(_HubPushMixin):
    """For the pipelines of the package (before ``DiffusionPipeline`` in the bases): saved folders
    and pushed repositories load with ``DiffusionPipeline.from_pretrained(...,
    trust_remote_code=True)``, checked loading, ``push_to_hub`` with a model card."""

    @classmethod
    def from_pretrained(
        cls: type[PipelineT], pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
    ) -> PipelineT:
        """``DiffusionPipeline.from_pretrained`` with safetensors forced for every component,
        after checking ``model_index.json`` (:func:`check_config`) and the code files: they run
        without ``trust_remote_code`` only when they are the installed package's own. A Hub
        repository is fetched with one ``snapshot_download`` (no pickle files), because
        ``DiffusionPipeline.download`` imports its ``pipeline.py`` before we could compare it."""
        _refuse_pickle(kwargs)
        source = str(pretrained_model_name_or_path)
        folder = Path(source)
        if not folder.is_dir():
            kwargs.pop("proxies", None)
            snapshot = {key: kwargs.pop(key) for key in _SNAPSHOT_KWARGS if key in kwargs}
            folder = Path(snapshot_download(source, ignore_patterns=PICKLE_PATTERNS, **snapshot))
        index = cls.load_config(folder)
        check_config(index, cls, DiffusionPipeline, folder / "model_index.json")
        code = code_files(folder, index)
        ours = _resource(HUB_CODE_FILE).read_bytes()
        foreign = [name for name in code if (folder / name).read_bytes() != ours]
        if foreign and not kwargs.get("trust_remote_code"):
            raise ValueError(
                f"{source} holds code files that are not the installed diffusers-mdit's "
                f"({', '.join(foreign)}). Read them, and pass trust_remote_code=True to run them; "
                "or save the pipeline again with the installed diffusers-mdit."
            )
        if code and not kwargs.get("custom_pipeline"):  # a custom_pipeline needs the user's trust
            kwargs["trust_remote_code"] = True
        pipeline = super().from_pretrained(str(folder), **kwargs)
        if folder != Path(source):
            pipeline.register_to_config(_name_or_path=source)
        return pipeline

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        push_to_hub: bool = False,
        **kwargs: Any,
    ) -> None:
        """``DiffusionPipeline.save_pretrained`` (safetensors only) plus the Hub files and the
        version (:func:`write_pipeline_hub_files`); ``push_to_hub=True`` pushes with our card."""
        _refuse_pickle_save(safe_serialization)
        push = {key: kwargs.pop(key) for key in _PUSH_KWARGS if key in kwargs}
        super().save_pretrained(save_directory, variant=variant, **kwargs)
        write_pipeline_hub_files(Path(save_directory))
        if push_to_hub:
            self._push_saved(save_directory, push)
