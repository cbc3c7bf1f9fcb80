"""Explainability toolkit: what a diffusion transformer learned (MDiT paper section 4,
appendices D, F.2, I.5 and M).

Every analysis is a function returning plain, JSON-serialisable numbers and a plotting
function writing PNG; ``mdit-explain ANALYSIS MODEL_OR_PIPELINE_DIR --output_dir DIR`` runs one
on a saved model or pipeline and writes ``DIR/<analysis>.json`` and its PNGs.
"""

from .common import LoadedModel, load_for_analysis, to_jsonable, write_json
from .core_contribution import core_contribution, plot_core_contribution, rho
from .destructive import (
    block_as_identity,
    destructive_test,
    outer_kernel,
    plot_destructive,
    rope_disabled,
)
from .focal import focal_patterns, plot_focal
from .mlp_probe import mlp_probe, plot_mlp_probe, train_probe
from .rope_probe import plot_rope_probe, rope_probe, rope_probe_language_model
from .spectrum import plot_spectrum, radial_power, spectral_analysis

__all__ = [
    "LoadedModel",
    "block_as_identity",
    "core_contribution",
    "destructive_test",
    "focal_patterns",
    "load_for_analysis",
    "mlp_probe",
    "outer_kernel",
    "plot_core_contribution",
    "plot_destructive",
    "plot_focal",
    "plot_mlp_probe",
    "plot_rope_probe",
    "plot_spectrum",
    "radial_power",
    "rho",
    "rope_disabled",
    "rope_probe",
    "rope_probe_language_model",
    "spectral_analysis",
    "to_jsonable",
    "train_probe",
    "write_json",
]
