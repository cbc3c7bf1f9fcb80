"""Saving, loading and pushing to the Hub the diffusers way, with checks on what is loaded.

diffusers 0.42 resolves a pipeline class only among its own (``_get_pipeline_class`` takes
``getattr(diffusers, model_index["_class_name"])``), and for a Hub repository it accepts a
component library other than diffusers/transformers only when the repository carries a code
file ``<component>/<library>.py`` (``_get_custom_components_and_folders``). So a folder we save
carries:

- ``model_index.json`` with ``"_class_name": ["pipeline", "<PipelineClass>"]`` (diffusers then
  imports ``pipeline.py`` of the folder or repo and takes the class from it), our components
  under the library ``"diffusers_mdit"``, and ``"_diffusers_mdit_version"``;
- ``pipeline.py`` and ``<component>/diffusers_mdit.py``: both the code file
  ``pipelines/pipeline.py`` of this repository, which hands out the installed package's classes;
- ``"_diffusers_mdit_version"`` in every model ``config.json``.

diffusers runs code files only with ``trust_remote_code=True``, even from a local folder. Loading
through our own classes (``MDiTPipeline.from_pretrained``) needs no such flag: the code files
that diffusers would run are compared byte for byte with the installed package's and, when they
match, running them runs only the installed package. Anything else still needs the flag.

Loading checks what it loads: safetensors only (pickle can execute code), readable JSON,
present and well-formed weight files, a known ``_class_name`` and a
``_diffusers_mdit_version`` not newer than the installed package; errors name the file and the
fix. ``push_to_hub`` writes a model card from ``model_cards/model_card_template.md`` and never
replaces a README that is already in the repository unless told to.

The code file and the card template live in the repository folders ``pipelines/`` and
``model_cards/`` (next to ``src/``), so this module finds them in a source checkout or an
editable install (``pip install -e .``, what ``run.sh`` does).
"""

from __future__ import annotations

import importlib.resources
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, TypeVar

import PIL.Image
import torch
from diffusers import DiffusionPipeline, ModelMixin
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
from huggingface_hub import HfApi, ModelCard, ModelCardData, snapshot_download
from huggingface_hub.errors import OfflineModeIsEnabled
from packaging.version import InvalidVersion, Version
from safetensors import SafetensorError, safe_open

from .families import FAMILIES

# Files of the repository folders pipelines/ and model_cards/, shipped in wheels as the
# packages diffusers_mdit.hub_files and diffusers_mdit.model_cards (see pyproject.toml).
HUB_CODE_FILE = ("diffusers_mdit.hub_files", "pipelines", "pipeline.py")
MODEL_CARD_TEMPLATE = ("diffusers_mdit.model_cards", "model_cards", "model_card_template.md")

LIBRARY_NAME = "diffusers_mdit"
VERSION_KEY = "_diffusers_mdit_version"
PIPELINE_CODE_NAME = "pipeline"  # model_index.json: "_class_name": ["pipeline", "<Class>"]
COMPONENT_CODE_FILE = f"{LIBRARY_NAME}.py"  # <component>/diffusers_mdit.py
SAMPLE_GRID_NAME = "sample_grid"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
UPGRADE_HINT = "upgrade the package (pip install -U diffusers-mdit)"
SAFETENSORS_ONLY = (
    "diffusers-mdit saves and loads weights as safetensors only, because unpickling a weight "
    "file can run arbitrary code."
)
_HUB_DOWNLOAD_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision")
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


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; ``OSError`` naming the file when it is missing or broken."""
    if not path.is_file():
        raise OSError(
            f"{path} is missing: {path.parent} is not a folder written by save_pretrained (or "
            "the subfolder is wrong). Save it again, or download it again with "
            "force_download=True."
        )
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise OSError(
            f"{path} is not valid JSON ({error}): the file is corrupted. Save it again, or "
            "download it again with force_download=True."
        ) from error
    if not isinstance(value, dict):
        raise OSError(f"{path} does not hold a JSON object: the file is corrupted.")
    return value


def check_saved_version(config: dict[str, Any], path: Path) -> None:
    """Refuse a config written by a newer diffusers-mdit: it may carry fields or semantics this
    version does not know, which would otherwise load silently wrong."""
    saved = config.get(VERSION_KEY)
    if saved is None:
        return
    try:
        newer = Version(str(saved)) > Version(installed_version())
    except InvalidVersion as error:
        raise ValueError(f"{path}: unreadable {VERSION_KEY} {saved!r}.") from error
    if newer:
        raise ValueError(
            f"{path} was saved by diffusers-mdit {saved}, newer than the installed "
            f"{installed_version()}: {UPGRADE_HINT} to load it."
        )


def check_class_name(name: Any, expected: type, known: dict[str, type], path: Path) -> None:
    """``name`` (a config's ``_class_name``) must be a class of the package, and ``expected``:
    loading one class's files into another fails late and obscurely."""
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


def check_weights(folder: Path, remote_files: Iterable[str] = ()) -> None:
    """The model in ``folder`` has readable safetensors weights (every shard of a sharded
    checkpoint). ``remote_files``: names in the folder that exist on the Hub but were not
    downloaded, so that pickle-only repositories are told apart from incomplete ones."""
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    safetensors = [name for name in present if name.endswith(".safetensors")]
    if not safetensors:
        pickles = sorted(_pickle_names({*present, *remote_files}))
        if pickles:
            raise ValueError(
                f"{folder} holds only pickle weights ({', '.join(pickles)}). {SAFETENSORS_ONLY} "
                "Convert them where you trust the file: load them with the library that wrote "
                "them and save with save_pretrained(..., safe_serialization=True)."
            )
        raise OSError(
            f"{folder} has no weights (expected {SAFETENSORS_WEIGHTS_NAME}): the save is "
            "incomplete or the download was interrupted. Save the model again, or download it "
            "again with force_download=True."
        )
    for name in present:
        if name.endswith(".safetensors.index.json"):
            shards = set(read_json(folder / name).get("weight_map", {}).values())
            missing = sorted(shards - set(present))
            if missing:
                raise OSError(
                    f"{folder / name} lists the shard(s) {', '.join(missing)}, missing from "
                    f"{folder}: save the model again, or download it again with "
                    "force_download=True."
                )
    for name in safetensors:
        try:
            with safe_open(folder / name, framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise OSError(
                f"{folder / name} is not a readable safetensors file ({error}): it is truncated "
                "or corrupted, or is a Git LFS pointer instead of the weights. Download it again "
                "with force_download=True, or save the model again."
            ) from error


def _weight_files(folder: Path, variant: str | None) -> list[Path]:
    """The safetensors files ``ModelMixin.from_pretrained`` reads for ``variant``: the shards
    of an index when there is one, else the single weights file."""
    stem, suffix = SAFETENSORS_WEIGHTS_NAME.rsplit(".", 1)
    single = f"{stem}.{variant}.{suffix}" if variant else SAFETENSORS_WEIGHTS_NAME
    for index in (
        folder / f"{single}.index.json",
        folder / f"{stem}.{suffix}.index.{variant}.json",
    ):
        if index.is_file():
            return sorted({folder / shard for shard in read_json(index)["weight_map"].values()})
    return [folder / single] if (folder / single).is_file() else []


def check_tensors(model: torch.nn.Module, folder: Path, variant: str | None = None) -> None:
    """Every tensor ``model`` expects is in the folder's weights with the right shape, and no
    other: diffusers only warns about missing tensors and leaves them on the meta device (or
    randomly initialised), so the model would fail, or sample noise, much later."""
    files = _weight_files(folder, variant)
    if not files:
        return
    stored: dict[str, tuple[int, ...]] = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            stored.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
    fix_keys = getattr(model, "_fix_state_dict_keys_on_load", None)
    if len(files) == 1 and fix_keys is not None:
        # The renaming diffusers applies on load (single files only, like diffusers: an old
        # sharded folder keeps its names here and is refused rather than half loaded).
        meta = {key: torch.empty(shape, device="meta") for key, shape in stored.items()}
        fix_keys(meta)
        stored = {key: tuple(t.shape) for key, t in meta.items()}
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    missing = sorted(expected.keys() - stored.keys())
    unknown = sorted(stored.keys() - expected.keys())
    shapes = [f"{key} {stored[key]} (expected {expected[key]})" for key in sorted(expected)
              if key in stored and stored[key] != expected[key]]  # fmt: skip
    problems = [
        f"{label} ({len(names)}): {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"
        for label, names in (("missing", missing), ("unknown", unknown), ("mis-shaped", shapes))
        if names
    ]
    if problems:
        raise ValueError(
            f"The weights in {folder} do not match {type(model).__name__}'s config: "
            f"{'; '.join(problems)}. The file is incomplete or belongs to another config: save "
            "the model again, or download it again with force_download=True."
        )


def _pickle_names(names: Iterable[str]) -> set[str]:
    return {name for name in names if name.endswith(PICKLE_SUFFIXES)}


def _refuse_pickle(kwargs: dict[str, Any]) -> None:
    """Loading: force ``use_safetensors=True``; refuse an explicit request for pickle."""
    if kwargs.get("use_safetensors") is False:
        raise ValueError(f"use_safetensors=False is not supported. {SAFETENSORS_ONLY}")
    kwargs["use_safetensors"] = True


def _refuse_pickle_save(safe_serialization: bool) -> None:
    if not safe_serialization:
        raise ValueError(f"safe_serialization=False is not supported. {SAFETENSORS_ONLY}")


# -- downloads --------------------------------------------------------------------------------


def download(
    repo_id: str, options: dict[str, Any], allow_patterns: list[str] | None = None
) -> tuple[Path, list[str]]:
    """Snapshot of ``repo_id`` without pickle files, and the repository's file list.

    Pops the Hub arguments (``revision``, ``token``, ``cache_dir``, ``force_download``,
    ``local_files_only``) from ``options``. The revision is resolved to one commit first, so the
    checks and the load see the same files. Offline, the cached snapshot is used and the file
    list is what it holds.
    """
    if repo_id.count("/") > 1 or os.path.isabs(repo_id) or repo_id.startswith("."):
        raise OSError(f"{repo_id} is not a folder (nor a Hub repository id).")
    hub = {key: options.pop(key) for key in _HUB_DOWNLOAD_KWARGS if key in options}
    options.pop("proxies", None)
    revision, token = hub.get("revision"), hub.get("token")
    local_only = bool(hub.get("local_files_only"))
    files: list[str] = []
    if not local_only:
        try:
            info = HfApi().model_info(repo_id, revision=revision, token=token)
            revision, files = info.sha, [sibling.rfilename for sibling in info.siblings or []]
        except OfflineModeIsEnabled:
            local_only = True
    folder = snapshot_download(
        repo_id,
        revision=revision,
        token=token,
        cache_dir=hub.get("cache_dir"),
        force_download=bool(hub.get("force_download")),
        local_files_only=local_only,
        allow_patterns=allow_patterns,
        ignore_patterns=[f"*{suffix}" for suffix in PICKLE_SUFFIXES],
    )
    return Path(folder), files


def _in_folder(files: Iterable[str], folder: str) -> list[str]:
    prefix = f"{folder}/" if folder else ""
    return [name[len(prefix) :] for name in files if name.startswith(prefix)]


def _own_weights(model: torch.nn.Module) -> None:
    """Give every CPU parameter and buffer memory of its own.

    diffusers leaves parameters as views of the memory-mapped safetensors file. Their odd
    alignment makes CPU kernels take other code paths (outputs differ from the saved model in
    the last bit), and the model would change or crash if the file were rewritten, e.g. by
    saving over the folder it came from. Owned copies make a reload bit-identical.
    """
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type == "cpu":
                tensor.data = tensor.data.clone()


# -- saved folders ----------------------------------------------------------------------------


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def stamp_model_config(folder: Path) -> None:
    """Record the package version in a saved model's ``config.json``."""
    config = read_json(folder / "config.json")
    config[VERSION_KEY] = installed_version()
    _write_json(folder / "config.json", config)


def write_pipeline_hub_files(folder: Path) -> None:
    """Make a folder written by ``DiffusionPipeline.save_pretrained`` loadable with
    ``DiffusionPipeline.from_pretrained(folder_or_repo, trust_remote_code=True)``: list-form
    ``_class_name``, the library ``"diffusers_mdit"`` for our components, the code files and
    the version."""
    code = _resource(HUB_CODE_FILE)
    index = read_json(folder / "model_index.json")
    index["_class_name"] = [PIPELINE_CODE_NAME, _class_name(index)]
    index[VERSION_KEY] = installed_version()
    for name, value in index.items():
        if _is_component(name, value) and str(value[0]).split(".")[0] == LIBRARY_NAME:
            index[name] = [LIBRARY_NAME, value[1]]
            shutil.copyfile(code, folder / name / COMPONENT_CODE_FILE)
    shutil.copyfile(code, folder / f"{PIPELINE_CODE_NAME}.py")
    _write_json(folder / "model_index.json", index)


def _class_name(index: dict[str, Any]) -> Any:
    name = index.get("_class_name")
    return name[1] if isinstance(name, list) and len(name) == 2 else name


def _is_component(name: str, value: Any) -> bool:
    return not name.startswith("_") and isinstance(value, list) and len(value) == 2


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


def check_pipeline_folder(
    folder: Path, expected: type, remote_files: Iterable[str] = ()
) -> tuple[list[str], list[str]]:
    """Check a saved pipeline before diffusers loads it. Returns the code files diffusers would
    run, and those of them that differ from the installed package's code file."""
    index_path = folder / "model_index.json"
    index = read_json(index_path)
    check_saved_version(index, index_path)
    check_class_name(_class_name(index), expected, known_classes(DiffusionPipeline), index_path)
    remote_files = list(remote_files)
    for name, value in index.items():
        if _is_component(name, value) and (folder / name / "config.json").is_file():
            check_weights(folder / name, _in_folder(remote_files, name))
    code = _resource(HUB_CODE_FILE).read_bytes()
    files = code_files(folder, index)
    return files, [name for name in files if (folder / name).read_bytes() != code]


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
    """Model card of one of our models or pipelines, from ``model_cards/model_card_template.md``.

    The card states what a user needs to judge and load the weights: the architecture (MDiT's
    ``{M, N, K, L}``), the parameter count, the training data and steps (``"unknown"`` unless
    given: the weights do not record them), the sample grid when one is uploaded (its file name
    in the repository, ``sample_grid``), the papers to cite, the license, and
    ``library_name: diffusers`` with tags so the Hub lists it with diffusers models.
    """
    is_pipeline = isinstance(obj, DiffusionPipeline)
    model = obj.transformer if is_pipeline else obj
    model_class = type(model).__name__
    if model_class not in FAMILIES:
        raise ValueError(f"No model card for {model_class}: not a model of diffusers-mdit.")
    family = FAMILIES[model_class]
    architecture, citation = family.architecture, family.citation
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
    card_data = ModelCardData(
        license=license,
        library_name="diffusers",
        pipeline_tag=pipeline_tag,
        datasets=datasets,
        tags=list(
            dict.fromkeys(["diffusers", "diffusers-mdit", family.tag, conditioning, *(tags or ())])
        ),
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(_resource(MODEL_CARD_TEMPLATE)),
        repo_id=repo_id or f"<your {'pipeline' if is_pipeline else 'model'} repo>",
        is_pipeline=is_pipeline,
        class_name=type(obj).__name__,
        model_class=model_class,
        architecture=architecture,
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
        citation=citation,
        version=installed_version(),
    )


# -- pushing ----------------------------------------------------------------------------------


class _HubPushMixin:
    """``push_to_hub`` with a generated model card, shared by models and pipelines."""

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
        training_data: str = "unknown",
        training_steps: int | str = "unknown",
        sample_grid: PIL.Image.Image | str | os.PathLike | None = None,
        license: str = "unknown",
        tags: list[str] | None = None,
        datasets: list[str] | None = None,
        existing_model_card: ExistingModelCard = "error",
    ) -> str:
        """Save to a temporary folder and upload it to ``repo_id`` (created if needed) in one
        commit, with a model card (see :func:`create_model_card` for the card arguments).

        Args:
            sample_grid: Image (PIL or file) uploaded as ``sample_grid.<ext>`` and shown in the
                card.
            existing_model_card: What to do when the repository already has a README.md:
                ``"error"`` (default) refuses to push, ``"keep"`` pushes without a card and
                leaves the README as it is, ``"overwrite"`` replaces it with the generated card.

        Returns:
            The URL of the commit.
        """
        if existing_model_card not in ("error", "keep", "overwrite"):
            raise ValueError(
                f"existing_model_card must be 'error', 'keep' or 'overwrite', got "
                f"{existing_model_card!r}."
            )
        _refuse_pickle_save(safe_serialization)
        api = HfApi()
        repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        has_readme = api.file_exists(repo_id, "README.md", token=token)
        if has_readme and existing_model_card == "error":
            raise FileExistsError(
                f"{repo_id} already has a README.md, which push_to_hub does not replace silently. "
                "Pass existing_model_card='keep' to push without touching it, or "
                "existing_model_card='overwrite' to replace it with the generated model card."
            )
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, variant=variant)
            grid_name = _save_sample_grid(sample_grid, Path(folder)) if sample_grid else None
            if not has_readme or existing_model_card == "overwrite":
                card = create_model_card(
                    self,
                    repo_id=repo_id,
                    training_data=training_data,
                    training_steps=training_steps,
                    sample_grid=grid_name,
                    license=license,
                    tags=tags,
                    datasets=datasets,
                )
                card.save(os.path.join(folder, "README.md"))
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message or f"Upload {type(self).__name__}",
                token=token,
                create_pr=create_pr,
            )

    def _push_after_save(self, save_directory: str | os.PathLike, kwargs: dict[str, Any]) -> None:
        """``save_pretrained(..., push_to_hub=True)``: push through :meth:`push_to_hub`, so the
        card and README rules apply (diffusers' own path would write its bare card)."""
        repo_id = kwargs.pop("repo_id", Path(save_directory).name)
        self.push_to_hub(repo_id, **kwargs)


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
    def from_pretrained(
        cls: type[ModelT], pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
    ) -> ModelT:
        """``ModelMixin.from_pretrained`` after checking the config (known class, version) and
        the weights (present, safetensors, readable). A Hub repository is downloaded first (no
        pickle files) and loaded from the snapshot."""
        _refuse_pickle(kwargs)
        source = str(pretrained_model_name_or_path)
        subfolder = kwargs.get("subfolder") or ""
        remote_files: list[str] = []
        root = Path(source)
        if not root.is_dir():
            prefix = f"{subfolder}/" if subfolder else ""
            patterns = [f"{prefix}config.json", f"{prefix}*.safetensors", f"{prefix}*.index.json"]
            root, remote_files = download(source, kwargs, patterns)
        folder = root / subfolder
        config_path = folder / "config.json"
        config = read_json(config_path)
        check_saved_version(config, config_path)
        check_class_name(config.get("_class_name"), cls, known_classes(ModelMixin), config_path)
        check_weights(folder, _in_folder(remote_files, subfolder))
        loaded = super().from_pretrained(str(root), **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        check_tensors(model, folder, kwargs.get("variant"))
        if kwargs.get("device_map") is None:
            _own_weights(model)
        if root != Path(source):
            model.register_to_config(_name_or_path=source)
        return loaded

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
        """``ModelMixin.save_pretrained`` (safetensors only) plus the package version in
        ``config.json``; ``push_to_hub=True`` pushes through :meth:`push_to_hub`. ``variant``
        and ``max_shard_size`` are named because ``DiffusionPipeline.save_pretrained`` passes
        them only to save methods whose signature has them."""
        _refuse_pickle_save(safe_serialization)
        push_kwargs = {key: kwargs.pop(key) for key in _PUSH_KWARGS if key in kwargs}
        super().save_pretrained(
            save_directory,
            is_main_process=is_main_process,
            variant=variant,
            max_shard_size=max_shard_size,
            **kwargs,
        )
        if is_main_process:
            stamp_model_config(Path(save_directory))
            if push_to_hub:
                self._push_after_save(save_directory, {**push_kwargs, "variant": variant})


class HubPipelineMixin(_HubPushMixin):
    """For the pipelines of the package (before ``DiffusionPipeline`` in the bases): saved folders
    and pushed repositories load with ``DiffusionPipeline.from_pretrained(...,
    trust_remote_code=True)``, checked loading, ``push_to_hub`` with a model card."""

    @classmethod
    def from_pretrained(
        cls: type[PipelineT], pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
    ) -> PipelineT:
        """``DiffusionPipeline.from_pretrained`` after checking ``model_index.json`` (known
        class, this class, version) and every model's weights, with safetensors forced for all
        components. The folder's code files run without ``trust_remote_code`` only when they are
        the installed package's own; a Hub repository is downloaded first (no pickle files)."""
        _refuse_pickle(kwargs)
        source = str(pretrained_model_name_or_path)
        folder, remote_files = Path(source), []
        if not folder.is_dir():
            folder, remote_files = download(source, kwargs)
        code, foreign = check_pipeline_folder(folder, cls, remote_files)
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
        version (:func:`write_pipeline_hub_files`); ``push_to_hub=True`` pushes through
        :meth:`push_to_hub`."""
        _refuse_pickle_save(safe_serialization)
        push_kwargs = {key: kwargs.pop(key) for key in _PUSH_KWARGS if key in kwargs}
        super().save_pretrained(save_directory, variant=variant, **kwargs)
        write_pipeline_hub_files(Path(save_directory))
        if push_to_hub:
            self._push_after_save(save_directory, {**push_kwargs, "variant": variant})
