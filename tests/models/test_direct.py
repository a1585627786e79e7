"""Direct Models: the propagation target against hand-worked values, where gradients go (and
where they must not), the ablation switches, one-step sampling and a short training run."""

import pytest
import torch
from torch import nn

from onestep_models import direct
from onestep_models.dit import FlowDiT
from onestep_models.train import BatchRandom


def affine_w(a: float, b: float):
    """w(x, t) = a x + b t, elementwise."""
    return lambda x, t, y: a * x + b * t.reshape(-1, *([1] * (x.dim() - 1)))


def test_propagation_target_by_hand():
    x0 = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
    t = torch.tensor([0.5, 0.25])
    dt = 0.1
    w = affine_w(2.0, 1.0)            # w(x0, t) = 2 x0 + t
    v = lambda x, t, y: 3.0 * x       # noqa: E731

    # row 0: w = [2.5, -3.5]; x' = x0 + 0.5 w = [2.25, -3.75]; v = [6.75, -11.25]
    #        target = 0.4/0.5 * w + 0.1/0.5 * v = [2 + 1.35, -2.8 - 2.25] = [3.35, -5.05]
    # row 1: w = [1.25, 8.25]; x' = x0 + 0.25 w = [0.8125, 6.0625]; v = [2.4375, 18.1875]
    #        target = 0.15/0.25 * w + 0.1/0.25 * v = [0.75 + 0.975, 4.95 + 7.275] = [1.725, 12.225]
    expected = torch.tensor([[3.35, -5.05], [1.725, 12.225]])
    target = direct.propagation_target(w, v, x0, t, dt)
    torch.testing.assert_close(target, expected)

    # the loss compares w(x0, t + dt) = 2 x0 + t + dt with it, mean over the four elements
    pred = torch.tensor([[2.6, -3.4], [1.35, 8.35]])
    assert direct.propagation_loss(w, v, x0, t, dt).item() == pytest.approx(
        (pred - expected).square().mean().item(), rel=1e-6)


def test_plain_parametrization_by_hand():
    x0 = torch.tensor([[1.0, -2.0]])
    t = torch.tensor([0.5])
    w = affine_w(2.0, 1.0)
    v = lambda x, t, y: 3.0 * x       # noqa: E731
    # w = [2.5, -3.5]; x' = x0 + w = [3.5, -5.5]; target = w + 0.1 * 3 x' = [3.55, -5.15]
    target = direct.propagation_target(w, v, x0, t, 0.1, parametrization="plain")
    torch.testing.assert_close(target, torch.tensor([[3.55, -5.15]]))


def test_exact_flow_map_is_a_fixed_point():
    # Constant velocity c: phi(x0, t) = x0 + t c, so w = c for every t and the target is c.
    c = torch.tensor([[0.3, -1.2, 2.0]])
    x0 = torch.randn(1, 3)
    w = lambda x, t, y: c.expand_as(x)    # noqa: E731
    v = lambda x, t, y: c.expand_as(x)    # noqa: E731
    for tp in (0.01, 0.37, 0.99):
        t = torch.tensor([tp])
        torch.testing.assert_close(direct.propagation_target(w, v, x0, t, 0.01), c)
        assert direct.propagation_loss(w, v, x0, t, 0.01).item() == pytest.approx(0.0, abs=1e-12)


class Scale(nn.Module):
    """f(x, t) = s x + b t with learnable s, b."""

    def __init__(self, s: float, b: float):
        super().__init__()
        self.s, self.b = nn.Parameter(torch.tensor(s)), nn.Parameter(torch.tensor(b))

    def forward(self, x, t, y=None):
        return self.s * x + self.b * t.reshape(-1, *([1] * (x.dim() - 1)))


@pytest.mark.parametrize("stop_gradient", [True, False])
def test_gradients_train_w_only(stop_gradient, generator):
    w, v = Scale(0.7, -0.3), Scale(1.5, 0.2)
    x0 = torch.randn(5, 3, generator=generator)
    t = 0.01 + 0.98 * torch.rand(5, generator=generator)
    loss = direct.propagation_loss(w, v, x0, t, 0.01, stop_gradient=stop_gradient)
    loss.backward()
    assert v.s.grad is None and v.b.grad is None, "the propagation loss must not train v"
    assert w.s.grad is not None and w.s.grad.abs() > 0

    # With stop-gradient, w's gradient is the prediction's alone: compare with a detached target.
    w2 = Scale(0.7, -0.3)
    with torch.no_grad():
        target = direct.propagation_target(w2, v, x0, t, 0.01)
    (w2(x0, t + 0.01) - target).square().mean().backward()
    same = torch.allclose(w.s.grad, w2.s.grad) and torch.allclose(w.b.grad, w2.b.grad)
    assert same == stop_gradient


def test_bad_arguments():
    w = v = affine_w(1.0, 0.0)
    x0 = torch.randn(2, 3)
    with pytest.raises(ValueError, match="dt"):
        direct.propagation_loss(w, v, x0, torch.full((2,), 0.5), 0.0)
    with pytest.raises(ValueError, match="t:"):
        direct.propagation_loss(w, v, x0, torch.full((3,), 0.5), 0.01)
    with pytest.raises(ValueError, match="t:"):
        direct.propagation_loss(w, v, x0, torch.tensor([0.5, 0.0]), 0.01)
    with pytest.raises(ValueError, match="parametrization"):
        direct.propagation_loss(w, v, x0, torch.full((2,), 0.5), 0.01, parametrization="x")


def test_one_step_sample():
    x0 = torch.randn(4, 2)
    w = affine_w(-1.0, 0.5)
    torch.testing.assert_close(direct.sample(w, x0), x0 + (-x0 + 0.5))
    torch.testing.assert_close(direct.sample(w, x0, parametrization="plain"), x0 + (-x0 + 0.5))
    torch.testing.assert_close(direct.sample(w, x0, t=0.5), x0 + 0.5 * (-x0 + 0.25))


def tiny_dit(num_classes=3):
    return FlowDiT(input_size=4, patch_size=2, in_channels=1, hidden_size=32, depth=1,
                   num_heads=2, num_classes=num_classes, class_dropout_prob=0.1, fused=True)


@pytest.mark.parametrize("stop_gradient,parametrization",
                         [(True, "residual"), (False, "residual"), (True, "plain")])
def test_direct_model_trains(stop_gradient, parametrization, generator):
    torch.manual_seed(0)
    model = direct.DirectModel(tiny_dit(), tiny_dit(),
                               direct.DirectConfig(stop_gradient=stop_gradient,
                                                   parametrization=parametrization),
                               num_classes=3)
    x1 = torch.randn(16, 1, 4, 4, generator=generator).clamp(-1, 1)
    y = torch.randint(3, (16,), generator=generator)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        loss, logs = model.loss(x1, y, BatchRandom(step % 2, 16))
        assert set(logs) == {"cfm", "propagation"}
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-4:]) < 0.8 * sum(losses[:4])
    samples = model.samplers()
    assert set(samples) == {"direct_1step", "flow_euler_1step", "flow_euler_128step"}
    out = samples["direct_1step"](torch.randn(3, 1, 4, 4), torch.arange(3))
    assert out.shape == (3, 1, 4, 4) and torch.isfinite(out).all()
