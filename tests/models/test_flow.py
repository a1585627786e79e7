"""Flow matching core: interpolation, the CFM loss against a hand computation, sampler orders
of accuracy on an ODE with a known solution, guidance and class dropout."""

import math

import pytest
import torch

from onestep_models import flow


def test_interpolate_endpoints_and_midpoint(generator):
    x0, x1 = torch.randn(3, 2, 4, generator=generator), torch.randn(3, 2, 4, generator=generator)
    t = torch.tensor([0.0, 1.0, 0.25])
    xt = flow.interpolate(x0, x1, t)
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[1], x1[1])
    torch.testing.assert_close(xt[2], 0.75 * x0[2] + 0.25 * x1[2])
    with pytest.raises(ValueError, match="t:"):
        flow.interpolate(x0, x1, torch.zeros(2))


def test_cfm_loss_by_hand():
    x0 = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    x1 = torch.tensor([[3.0, 2.0], [1.0, 1.0]])
    t = torch.tensor([0.5, 0.0])

    def v(x, t, y):  # a model that returns 2 * x
        return 2 * x

    # x_t = [[2, 2], [0, -1]] -> prediction [[4, 4], [0, -2]]; target x1 - x0 = [[2, 0], [1, 2]]
    expected = ((4 - 2) ** 2 + (4 - 0) ** 2 + (0 - 1) ** 2 + (-2 - 2) ** 2) / 4
    assert flow.cfm_loss(v, x1, x0=x0, t=t).item() == pytest.approx(expected)
    # the exact velocity of a straight path has zero loss
    assert flow.cfm_loss(lambda x, t, y: x1 - x0, x1, x0=x0, t=t).item() == 0.0


def test_cfm_loss_draws_x0_and_t_from_its_generator():
    """Without x0 and t the loss draws them, x0 first then t, from `generator`: the same seed
    gives the same loss, equal to the loss at those draws; a model's wrong output shape is
    named."""
    x1 = torch.randn(5, 3)

    def v(x, t, y):
        return x * t[:, None]

    g = torch.Generator().manual_seed(3)
    x0, t = torch.randn(5, 3, generator=g), torch.rand(5, generator=g)
    expected = flow.cfm_loss(v, x1, x0=x0, t=t)
    for _ in range(2):
        drawn = flow.cfm_loss(v, x1, generator=torch.Generator().manual_seed(3))
        assert drawn.item() == expected.item()
    with pytest.raises(ValueError, match="v: returned shape"):
        flow.cfm_loss(lambda x, t, y: x[:, :2], x1)


def linear_ode(rate):
    return lambda x, t, y: rate * x  # x(1) = x(0) e^rate


@pytest.mark.parametrize("sampler,order", [(flow.euler, 1), (flow.heun, 2)])
def test_fixed_step_samplers_converge_at_their_order(sampler, order, generator):
    x0 = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    exact = x0 * math.e
    errors = [(sampler(linear_ode(1.0), x0, steps) - exact).abs().max().item()
              for steps in (16, 32)]
    assert errors[1] < errors[0]
    assert errors[0] / errors[1] == pytest.approx(2 ** order, rel=0.15)


def test_rk45_reaches_its_tolerance(generator):
    x0 = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    x1, nfe = flow.rk45(linear_ode(-0.7), x0, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(x1, x0 * math.exp(-0.7), rtol=1e-6, atol=1e-7)
    assert 0 < nfe < 500


def test_time_dependent_velocity_is_evaluated_at_the_right_times(generator):
    x0 = torch.zeros(2, 1, dtype=torch.float64)
    v = lambda x, t, y: (3 * t**2)[:, None]  # noqa: E731  x(1) = 1
    assert flow.heun(v, x0, 64)[0].item() == pytest.approx(1.0, abs=1e-3)
    assert flow.euler(v, x0, 1)[0].item() == 0.0  # one Euler step reads v at t = 0


def test_guidance_combines_conditional_and_null():
    def v(x, t, y):
        return x + y[:, None].to(x.dtype)

    x = torch.zeros(2, 3)
    out = flow.guided(v, cfg_scale=3.0, null_class=10)(x, torch.zeros(2), torch.tensor([1, 2]))
    torch.testing.assert_close(out, torch.tensor([[10.0 + 3 * (1 - 10)] * 3,
                                                  [10.0 + 3 * (2 - 10)] * 3]))
    with pytest.raises(ValueError, match="y:"):
        flow.guided(v, 2.0, 10)(x, torch.zeros(2), None)


def test_drop_labels(generator):
    y = torch.arange(10).repeat(100)
    dropped = flow.drop_labels(y, 0.3, null_class=10, generator=generator)
    fraction = (dropped == 10).float().mean().item()
    assert 0.25 < fraction < 0.35
    assert torch.equal(dropped[dropped != 10], y[dropped != 10])
    assert torch.equal(flow.drop_labels(y, 0.0, 10), y)
    with pytest.raises(ValueError, match="p:"):
        flow.drop_labels(y, 1.5, 10)


def test_bad_steps():
    with pytest.raises(ValueError, match="steps:"):
        flow.euler(linear_ode(1.0), torch.zeros(1, 1), 0)
