"""Explainability toolkit: what a diffusion transformer learned (MDiT paper section 4,
appendices D, F.2, I.5 and M).

Every analysis is a function returning plain, JSON-serialisable numbers and a plotting
function writing PNG; ``mdit-explain ANALYSIS MODEL_OR_PIPELINE_DIR --output_dir DIR`` runs one
on a saved model or pipeline and writes ``DIR/<analysis>.json`` and its PNGs.
"""

from .common import LoadedModel, load_for_analysis, to_jsonable, write_json

__all__ = ["LoadedModel", "load_for_analysis", "to_jsonable", "write_json"]
