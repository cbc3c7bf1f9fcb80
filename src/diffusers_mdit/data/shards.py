"""Latent shards: a dataset encoded once with a VAE (and a text encoder), stored as WebDataset
tar shards and read back with random access for training (section 5: latents and their
horizontal flips precomputed; for CC3M, FLAN-T5 states truncated to 16 tokens, no flips).

A shards folder, as :class:`LatentShardWriter` (``training/prepare_latents.py``) writes it:

- ``shard-000000.tar``, ...: WebDataset shards. Sample ``<key>`` has the members
  ``<key>.latent.npy`` ``(C, h, w)``; ``<key>.latent_flip.npy``, the latent of the horizontally
  flipped image (the VAE is not flip-equivariant, so flipping the latent would not be the
  same); ``<key>.cls``, the class label (-1 when unlabelled); ``<key>.json``, the auxiliary
  ``image_scale`` and ``aspect_ratio`` (:func:`aux_conditions`); and for captioned data
  ``<key>.txt`` (the caption), ``<key>.text.npy`` ``(S, D)`` text-encoder states and
  ``<key>.text_mask.npy`` ``(S,)``.
- ``index.npy``: each sample's shard, byte span, label and auxiliary values, so that training
  reads a sample with one seek and one read and never holds the data set in memory, and reads
  the labels of a whole global batch without touching the shards.
- ``metadata.json``: the VAE (name, ``scaling_factor``, ``shift_factor``), resolution, latent
  shape, classes, text encoder. Written last: a folder without it is an unfinished
  preparation.

Latents are stored ready for the model, ``(posterior mean - shift_factor) * scaling_factor``:
the inverse of what the pipelines do before ``vae.decode``. The posterior mean rather than a
sample makes preparation deterministic; the SD VAEs' posterior standard deviation is tiny.
"""

from __future__ import annotations

import functools
import glob
import io
import json
import os
import tarfile
from collections.abc import Iterable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .images import ImageDataset, resize_center_crop

FORMAT = "diffusers-mdit-latent-shards/1"
METADATA_FILE = "metadata.json"
INDEX_FILE = "index.npy"
SHARD_PATTERN = "shard-%06d.tar"
INDEX_DTYPE = np.dtype(
    [
        ("shard", "<i4"),
        ("start", "<i8"),
        ("end", "<i8"),
        ("label", "<i8"),
        ("image_scale", "<f4"),
        ("aspect_ratio", "<f4"),
    ]
)


def aux_conditions(width: int, height: int, resolution: int) -> tuple[float, float]:
    """The auxiliary conditions of a ``width`` x ``height`` image that is resized (shorter side)
    and center-cropped to ``resolution`` (G.4, after SDXL's micro-conditioning).

    ``image_scale = min(1, min(width, height) / resolution)``: below 1 only for images that were
    upscaled, "clamped at 1.0". ``aspect_ratio = width / height`` of the original image: what
    the center crop removed. 0 is reserved for "dropped" (:func:`drop_aux_conditions`).
    """
    return min(1.0, min(width, height) / resolution), width / height


@torch.no_grad()
def encode_latents(vae, pixel_values: torch.Tensor) -> torch.Tensor:
    """``(B, 3, R, R)`` images in [-1, 1] to the latents a model trains on,
    ``(posterior mean - shift_factor) * scaling_factor``, ``(B, C, R / f, R / f)``."""
    posterior = vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (posterior.mean - shift) * vae.config.scaling_factor


@torch.no_grad()
def encode_captions(
    text_encoder, tokenizer, captions: list[str], max_sequence_length: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Text-encoder states ``(B, S, D)`` and attention mask ``(B, S)`` of ``captions``, truncated
    and padded to ``S = max_sequence_length`` tokens exactly as
    :meth:`MDiTTextToImagePipeline.encode_prompt` encodes prompts."""
    tokens = tokenizer(
        list(captions),
        padding="max_length",
        max_length=max_sequence_length,
        truncation=True,
        return_tensors="pt",
    )
    ids = tokens.input_ids.to(text_encoder.device)
    mask = tokens.attention_mask.to(text_encoder.device)
    return text_encoder(ids, attention_mask=mask).last_hidden_state, mask


# -- writing ------------------------------------------------------------------------------------


def _sample_spans(path: str) -> list[tuple[int, int]]:
    """Byte spans ``[start, end)`` of the consecutive samples of a tar shard (a WebDataset
    sample is the run of members sharing the name up to the first dot)."""
    spans: list[list[int]] = []
    last_key = None
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            key = member.name.split(".", 1)[0]
            end = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            if key == last_key:
                spans[-1][1] = end
            else:
                spans.append([member.offset, end])
                last_key = key
    return [(start, end) for start, end in spans]


class LatentShardWriter:
    """Writes latent samples to WebDataset shards in ``output_dir``, then (on :meth:`close`) the
    index and ``metadata.json`` (see the module docstring for the layout).

    Every sample must have the same fields and shapes (all flipped or none, all with text or
    none).

    Args:
        output_dir: A new or empty folder.
        metadata: Recorded in ``metadata.json``: the VAE (``vae``, ``scaling_factor``,
            ``shift_factor``), ``resolution``, ``num_classes``, ``text_encoder``, the source.
            The writer adds the sample count, shards, latent shape, flips, text shape, dtype.
        shard_size: Samples per shard.
        dtype: Storage dtype of latents and text states ("float16" halves the size at a
            relative error of 5e-4, far below the noise the model is trained under).
    """

    def __init__(
        self,
        output_dir: str,
        metadata: dict | None = None,
        shard_size: int = 5000,
        dtype: str = "float16",
    ):
        import webdataset

        if os.path.isdir(output_dir) and any(
            name.endswith(".tar") or name in (METADATA_FILE, INDEX_FILE)
            for name in os.listdir(output_dir)
        ):
            raise ValueError(
                f"{output_dir!r} already holds latent shards; choose a new or empty folder."
            )
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}.")
        os.makedirs(output_dir, exist_ok=True)
        self.output_dir = output_dir
        self.metadata = dict(metadata or {})
        self.dtype = np.dtype(dtype)
        self._rows: list[tuple[int, float, float]] = []
        self._spans: list[tuple[int, int, int]] = []
        self._shards: list[str] = []
        self._layout: dict[str, tuple[int, ...]] | None = None
        self._writer = webdataset.ShardWriter(
            os.path.join(output_dir, SHARD_PATTERN),
            maxcount=shard_size,
            maxsize=float("inf"),
            post=self._index_shard,
            verbose=0,
            mtime=0,
        )

    def _index_shard(self, path: str) -> None:
        shard = len(self._shards)
        self._shards.append(os.path.basename(path))
        self._spans += [(shard, start, end) for start, end in _sample_spans(path)]

    def _array(self, value) -> np.ndarray:
        if isinstance(value, torch.Tensor):
            value = value.detach().float().cpu().numpy()
        return np.ascontiguousarray(value, dtype=self.dtype)

    def write(
        self,
        latent: torch.Tensor | np.ndarray,
        *,
        flipped_latent: torch.Tensor | np.ndarray | None = None,
        class_label: int = -1,
        image_scale: float = 1.0,
        aspect_ratio: float = 1.0,
        text_embedding: torch.Tensor | np.ndarray | None = None,
        text_mask: torch.Tensor | np.ndarray | None = None,
        caption: str | None = None,
    ) -> None:
        """Add one sample: ``latent`` ``(C, h, w)`` (already scaled, see
        :func:`encode_latents`), optionally the latent of the flipped image, the label, the
        auxiliary values, and text states ``(S, D)`` with their mask ``(S,)``."""
        if (text_embedding is None) != (text_mask is None):
            raise ValueError("Give text_embedding and text_mask together.")
        sample = {
            "__key__": f"{len(self._rows):09d}",
            "latent.npy": self._array(latent),
            "cls": int(class_label),
            "json": {"image_scale": float(image_scale), "aspect_ratio": float(aspect_ratio)},
        }
        if flipped_latent is not None:
            sample["latent_flip.npy"] = self._array(flipped_latent)
        if text_embedding is not None:
            sample["text.npy"] = self._array(text_embedding)
            sample["text_mask.npy"] = np.asarray(text_mask, dtype=np.uint8)
        if caption is not None:
            sample["txt"] = caption
        layout = {k: getattr(v, "shape", ()) for k, v in sample.items() if k != "__key__"}
        if self._layout is None:
            self._layout = layout
        elif layout != self._layout:
            raise ValueError(
                f"Sample {len(self._rows)} has fields {layout}, the first had {self._layout}; "
                "every sample needs the same fields and shapes."
            )
        self._writer.write(sample)
        self._rows.append((int(class_label), float(image_scale), float(aspect_ratio)))

    def close(self) -> dict:
        """Finish the last shard, write the index and ``metadata.json``; returns the metadata."""
        self._writer.close()
        if not self._rows:
            for name in self._shards:
                os.remove(os.path.join(self.output_dir, name))
            raise ValueError("No samples were written: the source is empty.")
        if len(self._spans) != len(self._rows):
            raise RuntimeError(f"Indexed {len(self._spans)} samples, wrote {len(self._rows)}.")
        index = np.zeros(len(self._rows), INDEX_DTYPE)
        index["shard"], index["start"], index["end"] = np.array(self._spans).T
        index["label"], index["image_scale"], index["aspect_ratio"] = np.array(self._rows).T
        np.save(os.path.join(self.output_dir, INDEX_FILE), index)
        layout = self._layout
        metadata = {
            "format": FORMAT,
            **self.metadata,
            "num_samples": len(self._rows),
            "shards": self._shards,
            "dtype": self.dtype.name,
            "latent_shape": list(layout["latent.npy"]),
            "flips": "latent_flip.npy" in layout,
            "text_embedding_shape": list(layout["text.npy"]) if "text.npy" in layout else None,
        }
        path = os.path.join(self.output_dir, METADATA_FILE)
        with open(path + ".tmp", "w") as f:
            json.dump(metadata, f, indent=2)
        os.replace(path + ".tmp", path)
        return metadata


def write_latent_shards(
    batches: Iterable[dict],
    writer: LatentShardWriter,
    vae,
    flips: bool = True,
    text_encoder=None,
    tokenizer=None,
    max_sequence_length: int = 16,
    max_samples: int | None = None,
    total: int | None = None,
) -> int:
    """Encode ``batches`` (as :func:`image_batches` / :func:`caption_batches` yield them) with
    ``vae`` (and the flipped images when ``flips``; the captions with ``text_encoder``) and
    write them; returns the number of samples written. ``total`` sizes the progress bar."""
    if text_encoder is not None and tokenizer is None:
        raise ValueError("A text encoder needs its tokenizer.")
    total = min(total, max_samples) if total is not None and max_samples is not None else total
    written = 0
    with tqdm(total=total or max_samples, unit="img", desc="encoding") as progress:
        for batch in batches:
            count = len(batch["pixel_values"])
            if max_samples is not None:
                count = min(count, max_samples - written)
                if count <= 0:
                    break
            pixels = batch["pixel_values"][:count]
            latents = encode_latents(vae, torch.cat([pixels, pixels.flip(-1)]) if flips else pixels)
            latents = latents.float().cpu()
            states = mask = None
            if text_encoder is not None:
                states, mask = encode_captions(
                    text_encoder, tokenizer, batch["captions"][:count], max_sequence_length
                )
                states, mask = states.float().cpu(), mask.cpu()
            for i in range(count):
                writer.write(
                    latents[i],
                    flipped_latent=latents[count + i] if flips else None,
                    class_label=int(batch["class_labels"][i]),
                    image_scale=float(batch["image_scale"][i]),
                    aspect_ratio=float(batch["aspect_ratio"][i]),
                    text_embedding=None if states is None else states[i],
                    text_mask=None if mask is None else mask[i],
                    caption=batch["captions"][i] if "captions" in batch else None,
                )
            written += count
            progress.update(count)
    return written


# -- sources ------------------------------------------------------------------------------------


def _collate(items: list[dict], resolution: int) -> dict:
    aux = [aux_conditions(*item["original_size"], resolution) for item in items]
    batch = {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "class_labels": torch.tensor([item["class_labels"] for item in items]),
        "image_scale": torch.tensor([scale for scale, _ in aux]),
        "aspect_ratio": torch.tensor([aspect for _, aspect in aux]),
    }
    if "caption" in items[0]:
        batch["captions"] = [item["caption"] for item in items]
    return batch


def image_batches(dataset: ImageDataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    """Batches of an :class:`ImageDataset` in order (sample ``i`` of the shards is row ``i``),
    with the auxiliary values of every image."""
    collate = functools.partial(_collate, resolution=dataset.resolution)
    return DataLoader(dataset, batch_size, num_workers=num_workers, collate_fn=collate)


def _caption_item(sample: tuple, resolution: int) -> dict:
    image, caption = sample
    return {
        "pixel_values": resize_center_crop(image, resolution),
        "class_labels": -1,
        "original_size": image.size,
        "caption": caption,
    }


def caption_batches(
    urls: str, resolution: int, batch_size: int, num_workers: int = 0
) -> DataLoader:
    """Batches of a CC3M-style WebDataset (``jpg``/``png`` + ``txt`` per sample, e.g. from
    img2dataset) at ``urls`` (brace notation, ``::`` between lists: ``cc3m/{00000..00331}.tar``),
    resized and center-cropped to ``resolution``; unreadable samples are skipped with a
    warning."""
    import webdataset as wds
    from webdataset.shardlists import expand_urls

    shards = expand_urls(urls)
    local = [u for u in shards if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not os.path.isfile(u)]
    if missing:
        raise ValueError(
            f"{len(missing)} WebDataset shard(s) of {urls!r} do not exist, e.g. {missing[0]!r}; "
            "check the path and the brace range."
        )
    skip = wds.warn_and_continue
    data = (
        wds.WebDataset(urls, shardshuffle=False, handler=skip, empty_check=False)
        .decode("pil", handler=skip)
        .to_tuple("jpg;jpeg;png;webp", "txt", handler=skip)
        .map(functools.partial(_caption_item, resolution=resolution))
    )
    collate = functools.partial(_collate, resolution=resolution)
    # WebDataset splits the shards between workers: more workers than shards would idle.
    workers = min(num_workers, len(shards))
    return DataLoader(data, batch_size, num_workers=workers, collate_fn=collate)


# -- reading ------------------------------------------------------------------------------------


def _resolve_shards(path: str) -> tuple[str, list[str]]:
    if os.path.isdir(path):
        folder, shards = path, sorted(glob.glob(os.path.join(path, "*.tar")))
    else:
        shards = sorted(glob.glob(path))
        folder = os.path.dirname(shards[0]) if shards else os.path.dirname(path)
    hint = "write them with training/prepare_latents.py"
    if not shards:
        what = "holds no .tar shards" if os.path.isdir(path) else "matches no folder or shards"
        raise ValueError(f"Latent shards {path!r} {what}; {hint}.")
    not_tar = [s for s in shards if not s.endswith(".tar")]
    if not_tar:
        raise ValueError(
            f"Latent shards {path!r} match {not_tar[0]!r}, which is not a .tar shard; give a "
            "shards folder or a glob of its .tar files (e.g. 'latents/shard-*.tar')."
        )
    if len({os.path.dirname(s) for s in shards}) > 1:
        raise ValueError(f"Latent shards {path!r} match files in several folders; use one folder.")
    if not os.path.isfile(os.path.join(folder, METADATA_FILE)):
        raise ValueError(
            f"Latent shards in {folder!r} have no {METADATA_FILE}: their preparation did not "
            f"finish (or another tool wrote them); {hint}."
        )
    return folder, shards


def _read_metadata(folder: str) -> dict:
    path = os.path.join(folder, METADATA_FILE)
    hint = "write the shards again with training/prepare_latents.py"
    try:
        with open(path) as f:
            metadata = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path!r} is not valid JSON ({error}); {hint}.") from error
    required = ("shards", "latent_shape", "flips")
    if not isinstance(metadata, dict) or any(key not in metadata for key in required):
        raise ValueError(
            f"{path!r} is not the metadata of latent shards (it needs the keys {required}); {hint}."
        )
    return metadata


def _read_index(folder: str) -> np.ndarray:
    path = os.path.join(folder, INDEX_FILE)
    hint = "write the shards again with training/prepare_latents.py"
    if not os.path.isfile(path):
        raise ValueError(f"Latent shards in {folder!r} have no {INDEX_FILE}; {hint}.")
    try:
        index = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(f"{path!r} cannot be read ({error}); {hint}.") from error
    if index.dtype.names is None or set(INDEX_DTYPE.names) - set(index.dtype.names):
        raise ValueError(
            f"{path!r} is not an index of latent shards (fields {INDEX_DTYPE.names}); {hint}."
        )
    return index


class LatentShardDataset(Dataset):
    """Map-style (random access) dataset over the latent shards of a folder or glob.

    Items are ``{"latents": (C, h, w) float32, "class_labels": int, "image_scale": float,
    "aspect_ratio": float}``, plus ``"encoder_hidden_states"`` ``(S, D)`` float32 and
    ``"encoder_attention_mask"`` ``(S,)`` int64 for captioned shards. ``dataset[i]`` is the
    stored image's latent; :meth:`item` with ``flip=True`` the flipped image's, so that the
    trainer draws the choice from its step generator and a resumed run sees the same flips.

    Args:
        path: A shards folder, or a glob of shards in one folder (a subset, e.g. for a held-out
            split: ``"latents/shard-00000[0-7].tar"``).
    """

    def __init__(self, path: str):
        self.folder, shards = _resolve_shards(path)
        self.metadata = _read_metadata(self.folder)
        known = {name: i for i, name in enumerate(self.metadata["shards"])}
        names = [os.path.basename(s) for s in shards]
        unknown = [name for name in names if name not in known]
        if unknown:
            raise ValueError(
                f"{unknown[0]!r} in {self.folder!r} is not listed in its {METADATA_FILE}; the "
                "folder mixes shards of different preparations."
            )
        index = _read_index(self.folder)
        self.index = index[np.isin(index["shard"], [known[name] for name in names])]
        self.paths = {known[os.path.basename(shard)]: shard for shard in shards}

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.metadata["latent_shape"])

    @property
    def num_classes(self) -> int:
        return int(self.metadata.get("num_classes", 0))

    @property
    def has_flips(self) -> bool:
        return bool(self.metadata["flips"])

    @property
    def has_text(self) -> bool:
        return self.metadata.get("text_embedding_shape") is not None

    @property
    def text_embedding_dim(self) -> int | None:
        return self.metadata["text_embedding_shape"][-1] if self.has_text else None

    def __len__(self) -> int:
        return len(self.index)

    def _members(self, index: int) -> dict[str, bytes]:
        row = self.index[index]
        path = self.paths[int(row["shard"])]
        with open(path, "rb") as f:
            f.seek(int(row["start"]))
            blob = f.read(int(row["end"] - row["start"]))
        try:
            with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tar:
                return {m.name.split(".", 1)[1]: tar.extractfile(m).read() for m in tar}
        except (tarfile.TarError, IndexError, AttributeError) as error:
            raise ValueError(
                f"Sample {index} of {path!r} cannot be read ({type(error).__name__}: {error}): "
                "the shard is truncated or corrupt; write the shards again with "
                "training/prepare_latents.py."
            ) from error

    def item(self, index: int, flip: bool = False) -> dict[str, torch.Tensor | int | float]:
        """Sample ``index``, with the latent of the horizontally flipped image if ``flip``."""
        if flip and not self.has_flips:
            raise ValueError(f"The shards in {self.folder!r} store no flipped latents.")
        members = self._members(index)

        def array(name: str) -> torch.Tensor:
            return torch.from_numpy(np.load(io.BytesIO(members[name]), allow_pickle=False))

        row = self.index[index]
        item = {
            "latents": array("latent_flip.npy" if flip else "latent.npy").float(),
            "class_labels": int(row["label"]),
            "image_scale": float(row["image_scale"]),
            "aspect_ratio": float(row["aspect_ratio"]),
        }
        if self.has_text:
            item["encoder_hidden_states"] = array("text.npy").float()
            item["encoder_attention_mask"] = array("text_mask.npy").long()
        return item

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int | float]:
        return self.item(index)

    def label(self, index: int) -> int:
        """The class of sample ``index`` (-1 when unlabelled), from the index."""
        return int(self.index["label"][index])

    def aux_conditions(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image_scale, aspect_ratio)`` of samples ``indices``, ``(B,)`` each, from the index."""
        rows = self.index[np.asarray(indices, dtype=np.int64)]
        return torch.from_numpy(rows["image_scale"].copy()), torch.from_numpy(
            rows["aspect_ratio"].copy()
        )

    def caption(self, index: int) -> str:
        """The caption of sample ``index`` (captioned shards)."""
        return self._members(index)["txt"].decode("utf-8")

    def load_vae(self, name_or_path: str | None = None):
        """The ``AutoencoderKL`` that decodes these latents: ``name_or_path`` or the one recorded
        at preparation; an error if its scaling or latent channels differ from the shards'."""
        from diffusers import AutoencoderKL

        name_or_path = name_or_path or self.metadata.get("vae")
        if not name_or_path:
            raise ValueError(
                f"{METADATA_FILE} in {self.folder!r} records no VAE; pass "
                "--pretrained_vae_model_name_or_path."
            )
        try:
            vae = AutoencoderKL.from_pretrained(name_or_path)
        except Exception as error:
            raise ValueError(
                f"Could not load the VAE {name_or_path!r} ({type(error).__name__}: {error}); "
                "pass --pretrained_vae_model_name_or_path with a local copy."
            ) from error
        scaling, channels = self.metadata.get("scaling_factor"), self.latent_shape[0]
        config = vae.config
        if config.latent_channels != channels or (
            scaling is not None and not np.isclose(config.scaling_factor, scaling)
        ):
            raise ValueError(
                f"The shards were encoded with scaling_factor {scaling} and {channels} latent "
                f"channels, the VAE {name_or_path!r} has {config.scaling_factor} and "
                f"{config.latent_channels}: it is not the VAE of these latents."
            )
        return vae.eval()

    def load_text_encoder(self, name_or_path: str | None = None):
        """``(T5EncoderModel, tokenizer)``: ``name_or_path`` or the encoder recorded at
        preparation; an error if its width differs from the shards' states."""
        from transformers import AutoTokenizer, T5EncoderModel

        name_or_path = name_or_path or self.metadata.get("text_encoder")
        if not name_or_path:
            raise ValueError(
                f"{METADATA_FILE} in {self.folder!r} records no text encoder; pass "
                "--text_encoder_name_or_path."
            )
        try:
            encoder = T5EncoderModel.from_pretrained(name_or_path)
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        except Exception as error:
            raise ValueError(
                f"Could not load the text encoder {name_or_path!r} ({type(error).__name__}: "
                f"{error}); pass --text_encoder_name_or_path with a local copy."
            ) from error
        if encoder.config.d_model != self.text_embedding_dim:
            raise ValueError(
                f"The shards hold {self.text_embedding_dim}-wide text states, the text encoder "
                f"{name_or_path!r} is {encoder.config.d_model} wide."
            )
        return encoder.eval(), tokenizer
