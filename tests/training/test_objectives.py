"""Training objectives, regularisers and condition dropout (diffusers_mdit.training).

Expected values are computed independently: with ``math``/``numpy`` from the formulas of the
papers on tensors of a few elements, or from the diffusers schedulers used for sampling.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from diffusers_mdit import MDiTTransformer2DModel
from diffusers_mdit.testing import TINY_MDIT
from diffusers_mdit.training import (
    ActivationCapture,
    EpsilonObjective,
    NoisyBatch,
    RectifiedFlowObjective,
    X0Objective,
    drop_aux_conditions,
    drop_labels,
    drop_text_conditions,
    make_objective,
    min_snr_weight,
    patch_regularization_loss,
    rectified_flow_variance_weight,
    scheduled_weight,
    training_losses,
    variance_matching_loss,
)


def cosine_alpha_bar(t: int, num_steps: int = 1000) -> float:
    """alpha_bar of the cosine schedule (Nichol & Dhariwal 2021, eq. 17) at index ``t``; the
    product of ``1 - beta_i`` telescopes to ``f(t + 1) / f(0)`` below the beta cap."""

    def f(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    return f((t + 1) / num_steps) / f(0)


def snr(t: int) -> float:
    alpha_bar = cosine_alpha_bar(t)
    return alpha_bar / (1 - alpha_bar)


def batch_of(x0, noise, timesteps, objective) -> NoisyBatch:
    x0, noise = torch.tensor(x0), torch.tensor(noise)
    timesteps = torch.as_tensor(timesteps)
    return NoisyBatch(
        x0=x0,
        noise=noise,
        timesteps=timesteps,
        model_timesteps=objective.model_timesteps(timesteps),
        noisy=objective.add_noise(x0, noise, timesteps),
        target=objective.target(x0, noise, timesteps),
    )


def phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


# -- Min-SNR ------------------------------------------------------------------------------------


def test_min_snr_weight_matches_cosine_formula_and_is_bounded():
    scheduler = X0Objective().noise_scheduler
    timesteps = torch.tensor([10, 500, 900])
    expected = [min(snr(t), 5.0) for t in (10, 500, 900)]
    assert expected[0] == 5.0 and expected[1] < 1.0  # one clipped, two unclipped timesteps
    weight = min_snr_weight(scheduler, timesteps, 5.0)
    assert weight.tolist() == pytest.approx(expected, rel=1e-4)
    eps_weight = min_snr_weight(scheduler, timesteps, 5.0, "epsilon")
    assert eps_weight.tolist() == pytest.approx([5.0 / snr(10), 1.0, 1.0], rel=1e-4)

    every = min_snr_weight(scheduler, torch.arange(1000), 5.0)
    assert every.max().item() == 5.0 and every.min().item() >= 0.0
    assert snr(0) > 2e4  # the unclipped SNR weight would be 4000x larger at t = 0


def test_x0_loss_is_min_snr_weighted_mse():
    objective = X0Objective()
    x0 = [[[[0.5, -1.0]]], [[[2.0, 0.0]]]]
    noise = [[[[0.3, 0.1]]], [[[-0.2, 1.0]]]]
    batch = batch_of(x0, noise, [10, 500], objective)
    output = torch.tensor([[[[0.0, -0.5]]], [[[1.0, 1.0]]]])
    expected = [
        5.0 * ((0.0 - 0.5) ** 2 + (-0.5 + 1.0) ** 2) / 2,
        snr(500) * ((1.0 - 2.0) ** 2 + (1.0 - 0.0) ** 2) / 2,
    ]
    assert objective.loss(output, batch).tolist() == pytest.approx(expected, rel=1e-4)
    a = math.sqrt(cosine_alpha_bar(500))
    s = math.sqrt(1 - cosine_alpha_bar(500))
    assert batch.noisy[1].flatten().tolist() == pytest.approx(
        [a * 2.0 + s * -0.2, a * 0.0 + s * 1.0], rel=1e-5
    )


def test_epsilon_loss_is_mse_on_noise():
    objective = EpsilonObjective()
    batch = batch_of([[[[0.5, -1.0]]]], [[[[0.3, 0.1]]]], [700], objective)
    output = torch.tensor([[[[0.0, 0.5]]]])
    expected = ((0.0 - 0.3) ** 2 + (0.5 - 0.1) ** 2) / 2
    assert objective.loss(output, batch).item() == pytest.approx(expected, rel=1e-5)


def test_flow_loss_and_forward_process():
    objective = RectifiedFlowObjective()
    batch = batch_of([[[[0.5, -1.0]]]], [[[[0.3, 0.1]]]], [0.25], objective)
    assert batch.noisy.flatten().tolist() == pytest.approx(
        [0.75 * 0.5 + 0.25 * 0.3, 0.75 * -1.0 + 0.25 * 0.1]
    )
    assert batch.model_timesteps.item() == pytest.approx(250.0)
    output = torch.tensor([[[[0.0, 1.0]]]])
    expected = ((0.0 - (0.3 - 0.5)) ** 2 + (1.0 - (0.1 + 1.0)) ** 2) / 2
    assert objective.loss(output, batch).item() == pytest.approx(expected, rel=1e-5)
    x0_hat = objective.predict_x0(output, batch.noisy, batch.timesteps)
    assert x0_hat.flatten().tolist() == pytest.approx(
        [0.45 - 0.25 * 0.0, -0.725 - 0.25 * 1.0], rel=1e-5
    )


# -- learned variance: DiT's hybrid loss -------------------------------------------------------


def test_learned_variance_kl_term_by_hand():
    objective = EpsilonObjective(learned_variance=True)
    t = 500
    x0, noise, eps_hat, v = [0.5, -1.0], [0.3, 0.1], [0.2, 0.4], [0.5, -0.6]
    batch = batch_of([[[x0]]], [[[noise]]], [t], objective)
    output = torch.tensor([[[eps_hat]], [[v]]]).reshape(1, 2, 1, 2)

    alpha_bar = objective.noise_scheduler.alphas_cumprod.double()
    a_t, a_prev = alpha_bar[t].item(), alpha_bar[t - 1].item()
    beta = 1 - a_t / a_prev
    posterior_var = beta * (1 - a_prev) / (1 - a_t)
    coef_x0 = beta * math.sqrt(a_prev) / (1 - a_t)
    coef_xt = (1 - a_prev) * math.sqrt(1 - beta) / (1 - a_t)
    expected_kl = []
    for x, n, e, value in zip(x0, noise, eps_hat, v, strict=True):
        x_t = math.sqrt(a_t) * x + math.sqrt(1 - a_t) * n
        x0_hat = (x_t - math.sqrt(1 - a_t) * e) / math.sqrt(a_t)
        true_mean = coef_x0 * x + coef_xt * x_t
        model_mean = coef_x0 * x0_hat + coef_xt * x_t
        frac = (value + 1) / 2
        model_var = math.exp(frac * math.log(beta) + (1 - frac) * math.log(posterior_var))
        kl = 0.5 * (
            math.log(model_var / posterior_var)
            + posterior_var / model_var
            + (true_mean - model_mean) ** 2 / model_var
            - 1
        )
        expected_kl.append(kl / math.log(2))
    mse = sum((e - n) ** 2 for e, n in zip(eps_hat, noise, strict=True)) / 2
    # lambda T = 0.001 * 1000 = 1: the VLB term enters unscaled.
    expected = mse + sum(expected_kl) / 2
    assert objective.loss(output, batch).item() == pytest.approx(expected, rel=1e-4)


def test_learned_variance_decoder_nll_at_t0_by_hand():
    objective = EpsilonObjective(learned_variance=True)
    x0 = [0.5, -1.0, 1.0]  # an inner bin and both edge bins
    eps_hat, v = [0.1, -0.2, 0.05], [0.0, 1.0, -1.0]
    batch = batch_of([[[x0]]], [[[[0.3, 0.1, -0.4]]]], [0], objective)
    beta0, beta1 = objective.noise_scheduler.betas[:2].double().tolist()
    a0, a1 = 1 - beta0, (1 - beta0) * (1 - beta1)
    # beta_tilde_0 = 0, so its log is clipped to that of beta_tilde_1.
    posterior_var_1 = beta1 * (1 - a0) / (1 - a1)
    nll = []
    for x, xt, e, value in zip(x0, batch.noisy.flatten().tolist(), eps_hat, v, strict=True):
        mean = (xt - math.sqrt(1 - a0) * e) / math.sqrt(a0)  # posterior mean at t=0 is x0_hat
        frac = (value + 1) / 2
        std = math.exp(0.5 * (frac * math.log(beta0) + (1 - frac) * math.log(posterior_var_1)))
        upper, lower = (x - mean + 1 / 255) / std, (x - mean - 1 / 255) / std
        if x < -0.999:
            p = phi(upper)
        elif x > 0.999:
            p = 1 - phi(lower)
        else:
            p = phi(upper) - phi(lower)
        nll.append(-math.log(p) / math.log(2))
    vlb = objective.variational_bound_term(
        torch.tensor(eps_hat).reshape(1, 1, 1, 3),
        torch.tensor(v).reshape(1, 1, 1, 3),
        batch.x0,
        batch.noisy,
        batch.timesteps,
    )
    assert vlb.item() == pytest.approx(sum(nll) / 3, rel=1e-4)


def test_learned_variance_vlb_trains_only_the_variance():
    objective = EpsilonObjective(learned_variance=True)
    generator = torch.Generator().manual_seed(0)
    batch = objective.prepare(torch.randn(2, 3, 4, 4, generator=generator), generator)
    output = torch.randn(2, 6, 4, 4, generator=generator, requires_grad=True)
    objective.loss(output, batch).sum().backward()
    mse_grad = 2 * (output[:, :3] - batch.noise).detach() / (3 * 4 * 4)
    torch.testing.assert_close(output.grad[:, :3], mse_grad)
    assert output.grad[:, 3:].abs().sum() > 0


def test_output_channel_mismatch_is_a_clear_error():
    objective = EpsilonObjective(learned_variance=True)
    batch = objective.prepare(torch.zeros(1, 3, 4, 4), torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="out_channels = 6"):
        objective.loss(torch.zeros(1, 3, 4, 4), batch)
    with pytest.raises(ValueError, match="Unknown objective"):
        make_objective("v_prediction")


# -- variance matching --------------------------------------------------------------------------


def test_variance_matching_by_hand():
    x0 = np.array([[[[1.0, 2.0], [3.0, 5.0]], [[0.0, 0.0], [1.0, -1.0]]]])
    x0_hat = np.array([[[[1.0, 1.0], [2.0, 2.0]], [[0.5, 0.0], [0.0, 0.0]]]])
    expected = np.mean(
        [abs(np.var(x0[0, c], ddof=1) - np.var(x0_hat[0, c], ddof=1)) for c in range(2)]
    )
    # channel 0: var(1,2,3,5) = 35/12, var(1,1,2,2) = 1/3; channel 1: 2/3 and 1/16
    assert expected == pytest.approx((35 / 12 - 1 / 3 + 2 / 3 - 1 / 16) / 2)
    loss = variance_matching_loss(
        torch.tensor(x0_hat), torch.tensor(x0), weight=0.1, time_weight=torch.tensor([0.5])
    )
    assert loss.item() == pytest.approx(0.1 * 0.5 * expected, rel=1e-6)


def test_rectified_flow_variance_weight_eq7():
    t = torch.tensor([0.0, 0.5, 1.0])
    expected = [1.0, math.sqrt(0.01) * 0.5 / math.sqrt(0.51), 0.0]
    assert rectified_flow_variance_weight(t).tolist() == pytest.approx(expected, abs=1e-7)
    assert RectifiedFlowObjective().variance_matching_time_weight(t).tolist() == pytest.approx(
        expected, abs=1e-7
    )


def test_epsilon_variance_matching_weight_cancels_x0_amplification():
    objective = EpsilonObjective()
    weight = objective.variance_matching_time_weight(torch.tensor([10, 900, 999]))
    assert weight[0].item() == 1.0
    assert weight[1].item() == pytest.approx(snr(900), rel=1e-4)
    assert X0Objective().variance_matching_time_weight(torch.tensor([3, 999])).tolist() == [1, 1]


def test_scheduled_weight_switches_off_at_step():
    assert scheduled_weight(0.1, 99_999, 100_000) == 0.1
    assert scheduled_weight(0.1, 100_000, 100_000) == 0.0
    assert scheduled_weight(0.1, 10**9, None) == 0.1


# -- patch regularisation -----------------------------------------------------------------------


def test_patch_loss_by_hand_with_numpy_fft():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 4, 6, 3))
    expected = []
    for sample in x:
        total = 0.0
        for c in range(3):
            spectrum = np.abs(np.fft.fft2(sample[..., c]))
            checker = [(0, 3), (2, 0), (2, 3)]
            baseline = (spectrum.sum() - sum(spectrum[f] for f in checker)) / 24
            total += sum(max(spectrum[f] - baseline, 0.0) for f in checker)
        expected.append(total / (4 * 6 * 3))
    loss = patch_regularization_loss(torch.tensor(x))
    assert loss.tolist() == pytest.approx(expected, rel=1e-6)
    assert min(expected) > 0  # the test exercises the penalty, not only the relu's zero side


def test_patch_loss_analytic_cases():
    h, w = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    checkerboard = ((-1.0) ** (h + w))[None, :, :, None]
    # All power (16) at (H/2, W/2), a zero baseline: 16 / (4 * 4 * 1).
    assert patch_regularization_loss(checkerboard).item() == pytest.approx(1.0)
    stripes = ((-1.0) ** h)[None, :, :, None].float()
    assert patch_regularization_loss(stripes).item() == pytest.approx(1.0)
    assert patch_regularization_loss(torch.ones(1, 4, 4, 2)).item() == 0.0


def test_patch_loss_gradient_skips_the_baseline():
    x = torch.randn(1, 4, 4, 1, generator=torch.Generator().manual_seed(1), requires_grad=True)
    patch_regularization_loss(x).sum().backward()
    # Reference: the excess at the three frequencies with the baseline as a constant.
    y = x.detach().clone().requires_grad_(True)
    spectrum = torch.fft.fft2(y[0, :, :, 0]).abs()
    baseline = (spectrum.sum() - spectrum[0, 2] - spectrum[2, 0] - spectrum[2, 2]).detach() / 16
    checker = torch.stack([spectrum[0, 2], spectrum[2, 0], spectrum[2, 2]])
    ((checker - baseline).clamp(min=0).sum() / 16).backward()
    torch.testing.assert_close(x.grad, y.grad)


# -- consistency with the sampling schedulers ---------------------------------------------------


def test_diffusion_objectives_round_trip_through_samplers():
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 3, 4, 4, generator=generator)
    for objective, sampler_cls in [
        (X0Objective(), DDIMScheduler),
        (EpsilonObjective(), DDPMScheduler),
        (EpsilonObjective(learned_variance=True), DDPMScheduler),
    ]:
        sampler = sampler_cls.from_config(objective.noise_scheduler.config)
        sampler.set_timesteps(50)
        t = sampler.timesteps[10]
        batch = batch_of(
            x0.tolist(), torch.randn(1, 3, 4, 4, generator=generator).tolist(), [int(t)], objective
        )
        output = batch.target
        if objective.learned_variance:
            output = torch.cat([output, torch.zeros_like(output)], dim=1)
        step = sampler.step(output, t, batch.noisy, generator=generator)
        torch.testing.assert_close(step.pred_original_sample, x0, atol=1e-4, rtol=1e-4)
        x0_hat = objective.predict_x0(output, batch.noisy, batch.timesteps)
        torch.testing.assert_close(x0_hat, x0, atol=1e-4, rtol=1e-4)


def test_flow_objective_matches_flow_match_euler_scheduler():
    objective = RectifiedFlowObjective()
    sampler = FlowMatchEulerDiscreteScheduler.from_config(objective.noise_scheduler.config)
    sampler.set_timesteps(10)
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, 4, 4, generator=generator).chunk(2)
    index = 3
    timestep = sampler.timesteps[index]
    t = sampler.sigmas[index].reshape(1)
    torch.testing.assert_close(objective.model_timesteps(t), timestep.reshape(1))
    noisy = objective.add_noise(x0, noise, t)
    torch.testing.assert_close(noisy, sampler.scale_noise(x0, timestep.reshape(1), noise))
    # The exact velocity moves x_t to the forward process at the next sigma.
    previous = sampler.step(objective.target(x0, noise, t), timestep, noisy).prev_sample
    next_t = sampler.sigmas[index + 1].reshape(1)
    torch.testing.assert_close(previous, objective.add_noise(x0, noise, next_t))


def test_logit_normal_timestep_statistics():
    objective = RectifiedFlowObjective()
    t = objective.sample_timesteps(20_000, torch.Generator().manual_seed(0))
    assert 0 < t.min() and t.max() < 1
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item()) < 0.03 and abs(logit.std().item() - 1) < 0.03
    assert abs(t.median().item() - 0.5) < 0.01
    again = objective.sample_timesteps(20_000, torch.Generator().manual_seed(0))
    assert torch.equal(t, again)


def test_uniform_timesteps_cover_the_schedule():
    t = X0Objective().sample_timesteps(20_000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min() == 0 and t.max() == 999
    assert abs(t.float().mean().item() - 499.5) < 10


# -- condition dropout --------------------------------------------------------------------------


def test_label_dropout_rate_and_determinism():
    labels = torch.arange(20_000) % 10
    dropped = drop_labels(labels, 10, 0.1, torch.Generator().manual_seed(0))
    again = drop_labels(labels, 10, 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(dropped, again)
    null = dropped == 10
    assert abs(null.float().mean().item() - 0.1) < 0.01
    assert torch.equal(dropped[~null], labels[~null])


def test_aux_condition_dropout_drops_both_together():
    scale, aspect = torch.full((20_000,), 0.75), torch.full((20_000,), 1.5)
    new_scale, new_aspect = drop_aux_conditions(
        scale, aspect, 0.1, torch.Generator().manual_seed(0)
    )
    assert torch.equal(new_scale == 0, new_aspect == 0)
    assert abs((new_scale == 0).float().mean().item() - 0.1) < 0.01
    assert set(new_scale.unique().tolist()) == {0.0, 0.75}


def test_caption_dropout_masks_whole_captions_like_the_pipelines_unconditional_branch():
    states, mask = torch.randn(20_000, 3, 2) + 5, torch.ones(20_000, 3, dtype=torch.long)
    new_states, new_mask = drop_text_conditions(states, mask, 0.1, torch.Generator().manual_seed(0))
    dropped = torch.rand(20_000, generator=torch.Generator().manual_seed(0)) < 0.1
    assert new_mask.dtype == torch.long and abs(dropped.float().mean().item() - 0.1) < 0.01
    assert torch.equal(new_mask.sum(1) == 0, dropped)
    assert torch.equal(new_mask[~dropped], mask[~dropped])
    assert torch.equal(new_states[dropped], torch.zeros_like(states[dropped]))
    assert torch.equal(new_states[~dropped], states[~dropped])
    # A process's share of a global batch drops what the whole batch drops.
    whole = drop_text_conditions(states[:8], mask[:8], 0.5, torch.Generator().manual_seed(1))[1]
    parts = [
        drop_text_conditions(states[s], mask[s], 0.5, torch.Generator().manual_seed(1), s, 8)[1]
        for s in (slice(0, 4), slice(4, 8))
    ]
    assert torch.equal(torch.cat(parts), whole) and 0 < int((whole.sum(1) == 0).sum()) < 8


# -- a tiny MDiT learns under each objective ----------------------------------------------------


def fresh_tiny_mdit(out_channels: int | None = None) -> MDiTTransformer2DModel:
    """The tiny MDiT as initialised for training (G.3), not randomised."""
    torch.manual_seed(0)
    return MDiTTransformer2DModel(
        **TINY_MDIT, in_channels=3, out_channels=out_channels, num_classes=10
    )


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("x0", {}),
        ("epsilon", {}),
        ("epsilon", {"learned_variance": True}),
        ("flow", {}),
    ],
)
def test_optimisation_reduces_the_loss(name, kwargs):
    objective = make_objective(name, **kwargs)
    model = fresh_tiny_mdit(6 if kwargs.get("learned_variance") else None)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 8, 8, generator=generator)
    labels = drop_labels(torch.tensor([1, 2, 3, 4]), 10, 0.1, generator)
    batch = objective.prepare(x0, generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)

    def losses():
        with ActivationCapture(model.core_unpatch) as capture:
            output = model(batch.noisy, batch.model_timesteps, class_labels=labels).sample
        activation = capture.take()
        assert activation.shape == (4, 8, 8, 32)  # channels-last core un-patch output
        return training_losses(objective, output, batch, 0.05, activation, 0.01)

    first = losses()
    for _ in range(15):
        optimizer.zero_grad()
        terms = losses()
        terms["loss"].backward()
        optimizer.step()
    last = losses()
    assert all(torch.isfinite(v) for v in first.values())
    assert last["objective"] < 0.8 * first["objective"]
    assert last["loss"] < 0.8 * first["loss"]
