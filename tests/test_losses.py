"""The target-rate losses behave as the thesis's equations say."""

import math

import pytest
import torch

from lcodec.models.training.losses import (
    THESIS_BETA,
    BestStrategy,
    LambdaRD,
    LevelLoss,
    RateAdaptation,
    TargetBaseline,
    algorithm3_update,
    decayed_target,
    make_level_losses,
    rate_penalty,
)


def test_penalty_is_zero_at_the_parameter_and_quadratic_around_it():
    r = torch.tensor([0.25, 0.5, 0.125])
    p = rate_penalty(0.25, r, beta=100.0)
    assert p[0].item() == 0.0
    assert p[1].item() == pytest.approx(100.0 * 1.0)  # ((0.25 - 0.5) / 0.25)^2 = 1
    assert p[2].item() == pytest.approx(100.0 * 0.25)


def test_penalty_gradient_pulls_the_rate_towards_the_parameter():
    r = torch.tensor([0.3], requires_grad=True)
    rate_penalty(0.25, r, beta=10.0).sum().backward()
    assert r.grad.item() > 0  # descending the gradient lowers the rate
    r2 = torch.tensor([0.2], requires_grad=True)
    rate_penalty(0.25, r2, beta=10.0).sum().backward()
    assert r2.grad.item() < 0


def test_target_baseline_keeps_its_parameter_fixed():
    loss = TargetBaseline(r_target=0.25, beta=1.0)
    assert loss.current_param(0) == 0.25
    loss.observe(bpp_noisy=0.4, bpp_quantized=0.3, t=0)
    assert loss.current_param(1) == 0.25


def test_algorithm3_moves_r_param_by_the_measured_error_and_beta_towards_the_variance():
    r_param, beta = algorithm3_update(0.25, 100.0, r_target=0.25, measured_rate=0.30,
                                      measured_var=0.01, allowed_var=0.001, delta_beta=50.0)
    assert r_param == pytest.approx(0.20)
    assert beta == 150.0
    _, beta = algorithm3_update(0.25, 100.0, 0.25, 0.25, measured_var=0.0001, allowed_var=0.001, delta_beta=500.0)
    assert beta == 1.0  # never below epsilon


def test_rate_adaptation_follows_eq_6_5():
    loss = RateAdaptation(r_target=0.5, beta=1.0)
    assert loss.current_param(0) == 0.5  # R_shift_{-1} = 0
    loss.observe(bpp_noisy=0.62, bpp_quantized=0.55, t=0)
    assert loss.current_param(1) == pytest.approx(0.5 + 0.07)


def test_exponential_target_decay_of_eq_6_14():
    T = 1000
    assert decayed_target(0.06, 0, T) == 3.0  # 0.06 * 50 = 3.0 = r_max
    assert decayed_target(0.25, 0, T) == 3.0  # capped at r_max
    assert decayed_target(0.25, T // 2, T) == pytest.approx(0.25 * 50**0.5)
    assert decayed_target(0.25, T, T) == 0.25
    assert decayed_target(0.25, 5 * T, T) == 0.25
    assert decayed_target(0.75, 0, T) == 0.75  # only targets <= 0.5 decay
    values = [decayed_target(0.12, t, T) for t in range(0, T + 1, 50)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_best_strategy_smooths_the_parameter_with_an_ema():
    loss = BestStrategy(r_target=1.0, beta=1.0, T=100, alpha=0.99)
    assert loss.current_param(0) == 1.0  # the EMA starts at the first value
    loss.observe(bpp_noisy=1.5, bpp_quantized=1.0, t=0)  # shift 0.5 -> raw parameter 1.5
    assert loss.current_param(1) == pytest.approx(0.99 * 1.0 + 0.01 * 1.5)
    # Asking twice in the same step does not fold the value in twice.
    assert loss.current_param(1) == pytest.approx(0.99 * 1.0 + 0.01 * 1.5)
    state = loss.state()
    other = BestStrategy(r_target=1.0, beta=1.0, T=100)
    other.load_state(state)
    assert other.current_param(1) == loss.current_param(1)


def test_best_strategy_parameter_is_a_constant_for_backpropagation():
    loss = BestStrategy(r_target=0.5, beta=10.0, T=10)
    r = torch.tensor([0.7], requires_grad=True)
    loss.penalty(r, 0).sum().backward()
    p = loss.current_param(0)
    assert isinstance(p, float)
    assert r.grad.item() == pytest.approx(10.0 * 2 * (0.7 - p) / p**2)


def test_lambda_rd_is_linear_in_rate():
    loss = LambdaRD(r_target=0.25, lmbda=3.0)
    assert loss.penalty(torch.tensor([2.0]), 0).item() == 6.0


def test_level_losses_use_thesis_betas_and_scale_T_to_the_run():
    losses = make_level_losses("best", (0.06, 0.5, 2.0), total_steps=10000, beta_scale=0.5)
    assert [l.beta for l in losses] == [THESIS_BETA[0.06] * 0.5, THESIS_BETA[0.5] * 0.5, THESIS_BETA[2.0] * 0.5]
    assert losses[0].T == 2000  # thesis: T = 150k of 750k steps
    lam = make_level_losses("lambda", (0.12, 1.0), total_steps=1)
    assert lam[0].lmbda > lam[1].lmbda  # low rate = heavy rate weight
    assert math.isnan(lam[0].current_param(0))


@pytest.mark.parametrize("kind", ["best", "adaptive", "baseline", "lambda"])
def test_every_loss_keeps_the_level_loss_protocol(kind):
    """What the training loop relies on, for every loss: logging reads R_param and β without
    changing the state, and state()/load_state() carry a level over a checkpoint exactly."""
    losses: list[LevelLoss] = make_level_losses(kind, (0.12, 1.0), total_steps=100)
    for t, loss in enumerate(losses):
        loss.penalty(torch.tensor([0.3, 0.5]), t)
        loss.observe(bpp_noisy=0.4, bpp_quantized=0.35, t=t)
        before = loss.state()
        logged = loss.logged_param(t)
        loss.logged_param(t + 5)  # a step that did not train this level
        assert loss.state() == before
        if kind == "lambda":
            assert math.isnan(logged) and loss.beta is None
        else:
            assert logged == loss.current_param(t)  # the value the penalty of step t used
            assert loss.beta > 0
        resumed = make_level_losses(kind, (0.12, 1.0), total_steps=100)[t]
        resumed.load_state(before)
        assert resumed.state() == before
        assert resumed.penalty(torch.tensor([0.3]), t + 1).item() == loss.penalty(torch.tensor([0.3]), t + 1).item()
