"""Training objectives of the MDiT paper (section 5, appendix H.2) and condition dropout.

Three objectives, one interface (:class:`TrainingObjective`):

- ``"x0"``: the model predicts the clean sample (diffusers ``prediction_type="sample"``) on a
  cosine schedule with ``T = 1000``, weighted by Min-SNR-gamma with ``gamma = 5`` (section 5,
  Hang et al. 2023). Sampled with DDIM.
- ``"epsilon"``: DDPM noise prediction, optionally with a learned variance trained by DiT's
  hybrid loss (improved DDPM's ``L_simple + L_vlb``). Sampled with DDPM.
- ``"flow"``: rectified flow (H.2, SD3): ``x_t = (1 - t) x0 + t noise``, velocity target
  ``noise - x0``, logit-normal ``t``. Sampled with ``FlowMatchEulerDiscreteScheduler``.

Each objective owns the diffusers scheduler its model is sampled with (``noise_scheduler``), so
that training and sampling share one definition of the noise schedule: the diffusion
objectives add noise with ``DDPMScheduler.add_noise`` and take SNRs from its
``alphas_cumprod``. Tensors are ``(B, C, H, W)``, the diffusers layout; per-sample losses are
means over ``C, H, W`` (``mean_flat`` in DiT), returned as ``(B,)``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_snr
from diffusers.utils.torch_utils import randn_tensor


@dataclass
class NoisyBatch:
    """One training batch after the forward process.

    Attributes:
        x0: Clean samples ``(B, C, H, W)``.
        noise: Standard Gaussian noise, same shape.
        timesteps: ``(B,)`` in the objective's own units: integer indices ``0..T-1`` for the
            diffusion objectives, ``t`` in ``(0, 1)`` for rectified flow.
        model_timesteps: ``(B,)`` what the model receives as ``timestep`` (the sampling
            scheduler's units).
        noisy: The model input ``x_t``.
        target: The regression target of the model output.
    """

    x0: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    model_timesteps: torch.Tensor
    noisy: torch.Tensor
    target: torch.Tensor


class TrainingObjective(ABC):
    """A noise process, its regression target and its per-sample loss.

    Subclasses set ``noise_scheduler`` (the diffusers scheduler that samples a model trained
    with this objective; save its config with the pipeline) and ``learned_variance``.
    """

    noise_scheduler: DDPMScheduler | FlowMatchEulerDiscreteScheduler
    learned_variance: bool = False

    @abstractmethod
    def sample_timesteps(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """``(B,)`` training timesteps in the objective's units (see :class:`NoisyBatch`)."""

    @abstractmethod
    def model_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The ``timestep`` argument of the model for ``timesteps``."""

    @abstractmethod
    def add_noise(
        self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """The forward process: ``x_t`` from ``x0`` and ``noise``."""

    @abstractmethod
    def target(
        self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """What the model output regresses to."""

    @abstractmethod
    def predict_x0(
        self, model_output: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """The clean-sample estimate implied by ``model_output`` (used by variance matching)."""

    @abstractmethod
    def loss(self, model_output: torch.Tensor, batch: NoisyBatch) -> torch.Tensor:
        """Per-sample loss ``(B,)`` of the objective, weighting included."""

    @abstractmethod
    def variance_matching_time_weight(self, timesteps: torch.Tensor) -> torch.Tensor:
        """``(B,)`` factor on the variance-matching term at ``timesteps`` (eq. 2 / eq. 7)."""

    def prepare(
        self,
        x0: torch.Tensor,
        generator: torch.Generator | None = None,
        share: slice | None = None,
        global_batch_size: int | None = None,
    ) -> NoisyBatch:
        """Draw timesteps and noise (timesteps first, from the same ``generator``) and run
        the forward process.

        In distributed training ``x0`` is one process's ``share`` of a global batch of
        ``global_batch_size``: the draws are made for the whole global batch and sliced, so
        every sample gets the same noise whatever the number of processes.
        """
        size = global_batch_size or x0.shape[0]
        share = share or slice(None)
        timesteps = self.sample_timesteps(size, generator, x0.device)[share]
        noise = randn_tensor(
            (size, *x0.shape[1:]), generator=generator, device=x0.device, dtype=x0.dtype
        )[share]
        return NoisyBatch(
            x0=x0,
            noise=noise,
            timesteps=timesteps,
            model_timesteps=self.model_timesteps(timesteps),
            noisy=self.add_noise(x0, noise, timesteps),
            target=self.target(x0, noise, timesteps),
        )

    def split_output(self, model_output: torch.Tensor, channels: int) -> torch.Tensor:
        """The prediction part of ``model_output`` (the first ``channels`` channels when the
        model also outputs a variance), with a clear error for a mismatched ``out_channels``."""
        expected = 2 * channels if self.learned_variance else channels
        if model_output.shape[1] != expected:
            raise ValueError(
                f"The model outputs {model_output.shape[1]} channels for {channels} input "
                f"channels; this objective needs out_channels = {expected}"
                + (" (prediction and variance)." if self.learned_variance else ".")
            )
        return model_output[:, :channels]


def _expand(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def _uniform(
    batch_size: int, generator: torch.Generator | None, device: torch.device | str | None
) -> torch.Tensor:
    # Draw where the generator lives so a CPU generator gives the same numbers on any device.
    source = generator.device if generator is not None else device
    return torch.rand(batch_size, generator=generator, device=source).to(device)


# -- Min-SNR-gamma ------------------------------------------------------------------------------


def min_snr_weight(
    noise_scheduler: DDPMScheduler,
    timesteps: torch.Tensor,
    gamma: float,
    prediction_type: str = "sample",
) -> torch.Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023) for an MSE on ``prediction_type``.

    With ``SNR_t = alpha_bar_t / (1 - alpha_bar_t)`` (diffusers' ``compute_snr``), the weight
    that turns each parameterisation's MSE into ``min(SNR_t, gamma) * ||x0_hat - x0||^2`` is:

    - ``"sample"`` (x0): ``min(SNR_t, gamma)``. Bounded by ``gamma``; near 0 at ``t = T``.
      The plain SNR weight of diffusers' unconditional example reaches ~2.4e4 at ``t = 0`` on
      the cosine schedule and lets the least noisy steps dominate the gradient.
    - ``"epsilon"``: ``min(SNR_t, gamma) / SNR_t``, since ``||eps_hat - eps||^2 =
      SNR_t ||x0_hat - x0||^2``. Bounded by 1.
    """
    snr = compute_snr(noise_scheduler, timesteps)
    clipped = snr.clamp(max=gamma)
    if prediction_type == "sample":
        return clipped
    if prediction_type == "epsilon":
        return clipped / snr
    raise ValueError(f"Min-SNR weighting supports 'sample' and 'epsilon', not {prediction_type!r}.")


# -- Diffusion (DDPM schedule) objectives --------------------------------------------------------


class DiffusionObjective(TrainingObjective):
    """Shared part of the x0 and epsilon objectives: a ``DDPMScheduler`` noise schedule with
    uniformly drawn integer timesteps.

    Args:
        num_train_timesteps: ``T``.
        beta_schedule: A ``DDPMScheduler`` schedule; ``"squaredcos_cap_v2"`` is the cosine
            schedule of section 5 (Nichol & Dhariwal 2021).
        snr_gamma: Min-SNR ``gamma``; ``None`` for an unweighted MSE.
    """

    prediction_type: str

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "squaredcos_cap_v2",
        snr_gamma: float | None = None,
    ):
        self.snr_gamma = snr_gamma
        # clip_sample=False: latents are not confined to [-1, 1].
        self.noise_scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_schedule=beta_schedule,
            prediction_type=self.prediction_type,
            variance_type="learned_range" if self.learned_variance else "fixed_small",
            clip_sample=False,
        )

    @property
    def num_train_timesteps(self) -> int:
        return self.noise_scheduler.config.num_train_timesteps

    def sample_timesteps(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        source = generator.device if generator is not None else device
        timesteps = torch.randint(
            0, self.num_train_timesteps, (batch_size,), generator=generator, device=source
        )
        return timesteps.to(device)

    def model_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timesteps

    def add_noise(
        self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        return self.noise_scheduler.add_noise(x0, noise, timesteps)

    def _alpha_sigma(
        self, timesteps: torch.Tensor, like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
        return _expand(alphas_cumprod.sqrt(), like), _expand((1 - alphas_cumprod).sqrt(), like)

    def _mse_weight(self, timesteps: torch.Tensor) -> torch.Tensor:
        if self.snr_gamma is None:
            return torch.ones(timesteps.shape, device=timesteps.device)
        return min_snr_weight(self.noise_scheduler, timesteps, self.snr_gamma, self.prediction_type)

    def loss(self, model_output: torch.Tensor, batch: NoisyBatch) -> torch.Tensor:
        prediction = self.split_output(model_output, batch.x0.shape[1]).float()
        mse = _mean_flat((prediction - batch.target.float()) ** 2)
        return self._mse_weight(batch.timesteps).to(mse.device) * mse


class X0Objective(DiffusionObjective):
    """x0 prediction with Min-SNR-gamma on the cosine schedule (section 5): the paper's main
    objective. ``loss = min(SNR_t, gamma) * mean (x0_hat - x0)^2`` (see :func:`min_snr_weight`).
    """

    prediction_type = "sample"

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "squaredcos_cap_v2",
        snr_gamma: float | None = 5.0,
    ):
        super().__init__(num_train_timesteps, beta_schedule, snr_gamma)

    def target(
        self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        return x0

    def predict_x0(
        self, model_output: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        return self.split_output(model_output, noisy.shape[1])

    def variance_matching_time_weight(self, timesteps: torch.Tensor) -> torch.Tensor:
        """1: eq. 2 adds the term unweighted to the Min-SNR MSE."""
        return torch.ones(timesteps.shape, device=timesteps.device)


class EpsilonObjective(DiffusionObjective):
    """DDPM noise prediction, optionally with DiT's learned variance (section 5's epsilon
    models; the paper omits Min-SNR and variance matching for them, hence ``snr_gamma=None``).

    With ``learned_variance`` the model outputs ``2C`` channels, ``[eps_hat, v]``, and the loss
    is improved DDPM's hybrid loss as used by DiT: ``MSE(eps_hat, eps) + lambda T L_t`` where
    ``L_t`` is the variational bound term at ``t`` in bits per dimension, computed with
    ``eps_hat`` detached so that it trains the variance only. ``v`` in ``[-1, 1]``
    interpolates the log variance between the posterior variance ``beta_tilde_t`` and
    ``beta_t`` (diffusers' ``variance_type="learned_range"``, which the saved scheduler uses
    for sampling). ``lambda = 0.001`` (Nichol & Dhariwal 2021), so the factor is 1 for
    ``T = 1000``, as in DiT. Diffusers has no variational-bound loss; this follows
    ``improved-diffusion/gaussian_diffusion.py`` (``_vb_terms_bpd``).
    """

    prediction_type = "epsilon"
    vlb_weight_per_timestep = 0.001  # lambda of L_hybrid, scaled by T since L_vlb sums T terms

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "squaredcos_cap_v2",
        snr_gamma: float | None = None,
        learned_variance: bool = False,
    ):
        self.learned_variance = learned_variance
        super().__init__(num_train_timesteps, beta_schedule, snr_gamma)
        # Posterior q(x_{t-1} | x_t, x0) in float64 from the scheduler's betas, as improved DDPM
        # does: with float32 alpha_bar, 1 - alpha_bar_0 is off by 5e-4 relative to beta_0, which
        # moves the t = 0 decoder mean by a tenth of its standard deviation.
        betas = self.noise_scheduler.betas.double()
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        previous = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        posterior_variance = betas * (1 - previous) / (1 - alphas_cumprod)
        # beta_tilde_0 = 0; improved DDPM replaces its log by that of beta_tilde_1.
        self._posterior_log_variance = torch.log(
            torch.cat([posterior_variance[1:2], posterior_variance[1:]])
        ).float()
        self._log_betas = torch.log(betas).float()
        self._posterior_mean_x0 = (betas * previous.sqrt() / (1 - alphas_cumprod)).float()
        self._posterior_mean_xt = (
            (1 - previous) * (1 - betas).sqrt() / (1 - alphas_cumprod)
        ).float()

    def target(
        self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        return noise

    def predict_x0(
        self, model_output: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        return self._x0_from_eps(self.split_output(model_output, noisy.shape[1]), noisy, timesteps)

    def _x0_from_eps(
        self, eps: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        alpha, sigma = self._alpha_sigma(timesteps, noisy)
        return (noisy - sigma * eps) / alpha

    def variance_matching_time_weight(self, timesteps: torch.Tensor) -> torch.Tensor:
        """``min(SNR_t, 1)``: not in the paper, which uses no variance matching with epsilon.
        The x0 estimate ``(x_t - sigma eps_hat) / alpha`` amplifies the error of ``eps_hat``
        by ``1 / sqrt(SNR_t)`` (about 2e4 at ``t = T - 1`` on the cosine schedule), so a
        variance of it by ``1 / SNR_t``; this weight cancels that below ``SNR = 1`` and
        leaves eq. 2 unchanged above it."""
        return compute_snr(self.noise_scheduler, timesteps).clamp(max=1.0)

    def loss(self, model_output: torch.Tensor, batch: NoisyBatch) -> torch.Tensor:
        mse = super().loss(model_output, batch)
        if not self.learned_variance:
            return mse
        channels = batch.x0.shape[1]
        vlb = self.variational_bound_term(
            model_output[:, :channels].detach(),
            model_output[:, channels:],
            batch.x0,
            batch.noisy,
            batch.timesteps,
        )
        return mse + self.vlb_weight_per_timestep * self.num_train_timesteps * vlb

    def variational_bound_term(
        self,
        eps_hat: torch.Tensor,
        variance_values: torch.Tensor,
        x0: torch.Tensor,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> torch.Tensor:
        """``L_t`` of the variational bound in bits per dimension, ``(B,)``: for ``t > 0`` the
        KL between the true posterior ``q(x_{t-1} | x_t, x0)`` and the model's Gaussian
        ``p(x_{t-1} | x_t)``; for ``t = 0`` the negative log-likelihood of ``x0`` under the
        discretised Gaussian decoder (data in ``[-1, 1]`` with 256 levels, as in DDPM; DiT
        applies it unchanged to latents)."""
        x0, noisy = x0.float(), noisy.float()
        eps_hat, variance_values = eps_hat.float(), variance_values.float()
        device = x0.device

        def gather(table: torch.Tensor) -> torch.Tensor:
            return _expand(table.to(device)[timesteps], x0)

        coef_x0, coef_xt = gather(self._posterior_mean_x0), gather(self._posterior_mean_xt)
        min_log, max_log = gather(self._posterior_log_variance), gather(self._log_betas)
        true_mean = coef_x0 * x0 + coef_xt * noisy
        model_mean = coef_x0 * self._x0_from_eps(eps_hat, noisy, timesteps) + coef_xt * noisy
        fraction = (variance_values + 1) / 2
        model_log_variance = fraction * max_log + (1 - fraction) * min_log

        kl = _mean_flat(normal_kl(true_mean, min_log, model_mean, model_log_variance))
        decoder_nll = -_mean_flat(
            discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_variance)
        )
        return torch.where(timesteps.to(device) == 0, decoder_nll, kl) / math.log(2.0)


def normal_kl(
    mean1: torch.Tensor, log_var1: torch.Tensor, mean2: torch.Tensor, log_var2: torch.Tensor
) -> torch.Tensor:
    """Elementwise ``KL(N(mean1, exp(log_var1)) || N(mean2, exp(log_var2)))`` in nats."""
    return 0.5 * (
        -1.0
        + log_var2
        - log_var1
        + torch.exp(log_var1 - log_var2)
        + (mean1 - mean2) ** 2 * torch.exp(-log_var2)
    )


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor
) -> torch.Tensor:
    """Elementwise log-probability of ``x`` (in ``[-1, 1]``, 256 levels) under a Gaussian
    integrated over its bin of width ``2/255``; the edge bins extend to infinity (DDPM, Ho et
    al. 2020, eq. 13). Uses the exact normal CDF (improved DDPM uses a tanh approximation)."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (centered + 1.0 / 255.0)
    lower = inv_std * (centered - 1.0 / 255.0)
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_survival_lower = torch.special.log_ndtr(-lower)
    log_bin = torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12))
    return torch.where(
        x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_survival_lower, log_bin)
    )


# -- Rectified flow ------------------------------------------------------------------------------


class RectifiedFlowObjective(TrainingObjective):
    """Rectified flow (H.2; Liu et al. 2022, Esser et al. 2024).

    ``x_t = (1 - t) x0 + t noise``, target velocity ``noise - x0``, unweighted MSE, ``t`` from
    SD3's logit-normal density (``sigmoid`` of ``N(logit_mean, logit_std)``, diffusers'
    ``compute_density_for_timestep_sampling``), which H.2 calls "the recommended importance
    sampling". The model sees ``t * T``, the convention of ``FlowMatchEulerDiscreteScheduler``
    (``timestep = sigma * num_train_timesteps``, shift 1), which samples it.

    Args:
        num_train_timesteps: ``T`` of the sampling scheduler; scales the model timestep only.
        logit_mean: Mean of the logit-normal (0 in SD3).
        logit_std: Standard deviation of the logit-normal (1 in SD3).
        variance_matching_eps: ``epsilon`` of ``w_VAR`` (eq. 7), 0.01 in the paper.
    """

    prediction_type = "flow"

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        variance_matching_eps: float = 0.01,
    ):
        self.logit_mean = logit_mean
        self.logit_std = logit_std
        self.variance_matching_eps = variance_matching_eps
        self.noise_scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=num_train_timesteps, shift=1.0
        )

    def sample_timesteps(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        source = generator.device if generator is not None else device
        t = compute_density_for_timestep_sampling(
            "logit_normal",
            batch_size,
            logit_mean=self.logit_mean,
            logit_std=self.logit_std,
            device=source,
            generator=generator,
        )
        return t.to(device)

    def model_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timesteps * self.noise_scheduler.config.num_train_timesteps

    def add_noise(
        self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        t = _expand(timesteps, x0)
        return (1 - t) * x0 + t * noise

    def target(
        self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        return noise - x0

    def predict_x0(
        self, model_output: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """One Euler step from ``t`` to 0 (H.2): ``x0_hat = x_t - t v_hat``, the same step
        ``FlowMatchEulerDiscreteScheduler.step`` takes to ``sigma = 0``."""
        velocity = self.split_output(model_output, noisy.shape[1])
        return noisy - _expand(timesteps, noisy) * velocity

    def loss(self, model_output: torch.Tensor, batch: NoisyBatch) -> torch.Tensor:
        velocity = self.split_output(model_output, batch.x0.shape[1]).float()
        return _mean_flat((velocity - batch.target.float()) ** 2)

    def variance_matching_time_weight(self, timesteps: torch.Tensor) -> torch.Tensor:
        return rectified_flow_variance_weight(timesteps, self.variance_matching_eps)


def rectified_flow_variance_weight(t: torch.Tensor, eps: float = 0.01) -> torch.Tensor:
    """``w_VAR(t) = sqrt(eps) (1 - t) / sqrt(t + eps)`` (H.2, eq. 7): 1 at ``t = 0``, 0 at
    ``t = 1``, so variance matching acts mostly where the one-step Euler estimate of x0 is
    accurate."""
    return math.sqrt(eps) * (1 - t) / torch.sqrt(t + eps)


OBJECTIVES: dict[str, type[TrainingObjective]] = {
    "x0": X0Objective,
    "epsilon": EpsilonObjective,
    "flow": RectifiedFlowObjective,
}


def make_objective(name: str, **kwargs) -> TrainingObjective:
    """The objective called ``name`` (``"x0"``, ``"epsilon"`` or ``"flow"``, the values of
    ``--prediction_type``), built with ``kwargs``."""
    if name not in OBJECTIVES:
        raise ValueError(f"Unknown objective {name!r}; choose one of {sorted(OBJECTIVES)}.")
    return OBJECTIVES[name](**kwargs)


# -- Condition dropout for classifier-free guidance ----------------------------------------------


def drop_labels(
    class_labels: torch.Tensor,
    num_classes: int,
    probability: float = 0.1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Replace each label by the null label ``num_classes`` with ``probability`` (label dropout
    0.1 for classifier-free guidance, section 5 / Ho & Salimans 2021)."""
    dropped = _uniform(class_labels.shape[0], generator, class_labels.device) < probability
    return torch.where(dropped, torch.full_like(class_labels, num_classes), class_labels)


def drop_aux_conditions(
    image_scale: torch.Tensor,
    aspect_ratio: torch.Tensor,
    probability: float = 0.1,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Set both auxiliary conditions of a sample to 0 (the model's "dropped" value) with
    ``probability`` (G.4: dropped with probability 0.1). One draw per sample drops scale and
    aspect ratio together, as Fig. 19's "0.0 indicates dropout of both conditions"; the draw
    is independent of label dropout."""
    dropped = _uniform(image_scale.shape[0], generator, image_scale.device) < probability
    return (
        torch.where(dropped, torch.zeros_like(image_scale), image_scale),
        torch.where(dropped, torch.zeros_like(aspect_ratio), aspect_ratio),
    )


def drop_text_conditions(
    encoder_hidden_states: torch.Tensor,
    encoder_attention_mask: torch.Tensor,
    probability: float = 0.1,
    generator: torch.Generator | None = None,
    share: slice | None = None,
    global_batch_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption dropout: drop a sample's whole text with ``probability`` (0.1 for CC3M) by zeroing
    its states and every entry of its mask, which is exactly the unconditional input of
    :class:`~diffusers_mdit.MDiTTextToImagePipeline` (the model then attends to its time and
    null tokens only).

    In distributed training the tensors are one process's ``share`` of a global batch of
    ``global_batch_size``: the draws are made for the whole global batch and sliced, as in
    :meth:`TrainingObjective.prepare`.
    """
    size = global_batch_size or encoder_hidden_states.shape[0]
    draws = _uniform(size, generator, encoder_hidden_states.device)[share or slice(None)]
    dropped = draws < probability
    return (
        torch.where(
            dropped[:, None, None], torch.zeros_like(encoder_hidden_states), encoder_hidden_states
        ),
        torch.where(
            dropped[:, None], torch.zeros_like(encoder_attention_mask), encoder_attention_mask
        ),
    )
