"""Training library code: objectives, regularisers and condition dropout of the MDiT paper,
and the typed training configuration (the loop itself: :func:`.trainer.train`)."""

from .config import TrainingConfig
from .losses import (
    ActivationCapture,
    patch_regularization_loss,
    scheduled_weight,
    training_losses,
    variance_matching_loss,
)
from .objectives import (
    OBJECTIVES,
    DiffusionObjective,
    EpsilonObjective,
    NoisyBatch,
    RectifiedFlowObjective,
    TrainingObjective,
    X0Objective,
    discretized_gaussian_log_likelihood,
    drop_aux_conditions,
    drop_labels,
    drop_text_conditions,
    make_objective,
    min_snr_weight,
    normal_kl,
    rectified_flow_variance_weight,
)

__all__ = [
    "OBJECTIVES",
    "ActivationCapture",
    "DiffusionObjective",
    "EpsilonObjective",
    "NoisyBatch",
    "RectifiedFlowObjective",
    "TrainingConfig",
    "TrainingObjective",
    "X0Objective",
    "discretized_gaussian_log_likelihood",
    "drop_aux_conditions",
    "drop_labels",
    "drop_text_conditions",
    "make_objective",
    "min_snr_weight",
    "normal_kl",
    "patch_regularization_loss",
    "rectified_flow_variance_weight",
    "scheduled_weight",
    "training_losses",
    "variance_matching_loss",
]
