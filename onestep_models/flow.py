"""Flow matching: the interpolation, the conditional flow-matching (CFM) loss, ODE samplers and
classifier-free guidance.

Time convention (the Direct Models paper's, used across onestep): x_t = (1 - t) x0 + t x1 with
x0 ~ N(0, I) noise at t = 0 and x1 data at t = 1; the velocity is dx_t/dt = x1 - x0. A velocity
model is a callable v(x, t, y) -> tensor shaped like x, with t of shape (B,) in [0, 1] (a model
that wants another time scale, such as DiT's 0..1000, converts inside its wrapper).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from onestep_kernels.errors import ArgumentError

Velocity = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]


def _bcast(t: Tensor, x: Tensor) -> Tensor:
    """(B,) times -> broadcastable against x of shape (B, ...)."""
    return t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def interpolate(x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) x0 + t x1, t of shape (B,)."""
    if x0.shape != x1.shape:
        raise ArgumentError(f"x1: expected the shape of x0 {tuple(x0.shape)}, got "
                            f"{tuple(x1.shape)}")
    if t.shape != (x0.shape[0],):
        raise ArgumentError(f"t: expected shape ({x0.shape[0]},), got {tuple(t.shape)}")
    tb = _bcast(t, x0)
    return (1 - tb) * x0 + tb * x1


def cfm_loss(v: Velocity, x1: Tensor, y: Tensor | None = None, *, x0: Tensor | None = None,
             t: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Mean over all elements of (v(x_t, t, y) - (x1 - x0))^2, with x0 ~ N(0, I) and
    t ~ U[0, 1] drawn here unless given."""
    if x0 is None:
        x0 = torch.randn(x1.shape, generator=generator, dtype=x1.dtype).to(x1.device)
    if t is None:
        t = torch.rand(x1.shape[0], generator=generator).to(x1.device, x1.dtype)
    pred = v(interpolate(x0, x1, t), t, y)
    if pred.shape != x1.shape:
        raise ArgumentError(f"v: returned shape {tuple(pred.shape)}, expected {tuple(x1.shape)}")
    return (pred - (x1 - x0)).square().mean()


def _times(steps: int, t0: float, t1: float) -> list[float]:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ArgumentError(f"steps: expected a positive int, got {steps!r}")
    return np.linspace(t0, t1, steps + 1).tolist()


def _t(x: Tensor, value: float) -> Tensor:
    return torch.full((x.shape[0],), value, dtype=x.dtype, device=x.device)


@torch.no_grad()
def euler(v: Velocity, x0: Tensor, steps: int, y: Tensor | None = None, t0: float = 0.0,
          t1: float = 1.0) -> Tensor:
    """Integrate dx/dt = v from t0 to t1 with `steps` Euler steps (one evaluation each)."""
    times = _times(steps, t0, t1)
    x = x0
    for a, b in zip(times[:-1], times[1:]):
        x = x + (b - a) * v(x, _t(x, a), y)
    return x


@torch.no_grad()
def heun(v: Velocity, x0: Tensor, steps: int, y: Tensor | None = None, t0: float = 0.0,
         t1: float = 1.0) -> Tensor:
    """Heun's second-order method (two evaluations per step)."""
    times = _times(steps, t0, t1)
    x = x0
    for a, b in zip(times[:-1], times[1:]):
        h = b - a
        d0 = v(x, _t(x, a), y)
        d1 = v(x + h * d0, _t(x, b), y)
        x = x + 0.5 * h * (d0 + d1)
    return x


@torch.no_grad()
def rk45(v: Velocity, x0: Tensor, y: Tensor | None = None, t0: float = 0.0, t1: float = 1.0,
         rtol: float = 1e-5, atol: float = 1e-5) -> tuple[Tensor, int]:
    """Adaptive Dormand-Prince (scipy's RK45) on the flattened batch; returns (x1, number of
    velocity evaluations)."""
    from scipy.integrate import solve_ivp

    shape, dtype, device = x0.shape, x0.dtype, x0.device

    def rhs(t, flat):
        x = torch.from_numpy(flat).reshape(shape).to(device=device, dtype=dtype)
        return v(x, _t(x, float(t)), y).double().cpu().numpy().ravel()

    start = x0.detach().double().cpu().numpy().ravel()
    result = solve_ivp(rhs, (t0, t1), start, method="RK45", rtol=rtol, atol=atol)
    if not result.success:
        raise RuntimeError(f"rk45: the solver failed: {result.message}")
    x1 = torch.from_numpy(result.y[:, -1]).reshape(shape).to(device=device, dtype=dtype)
    return x1, int(result.nfev)


def guided(v: Velocity, cfg_scale: float, null_class: int) -> Velocity:
    """Classifier-free guidance: v_u + s (v_c - v_u), the conditional and unconditional
    (null-class) velocities evaluated in one doubled batch."""

    def v_cfg(x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        if y is None:
            raise ArgumentError("y: classifier-free guidance needs class labels")
        y_null = torch.full_like(y, null_class)
        out = v(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null]))
        cond, uncond = out.chunk(2)
        return uncond + cfg_scale * (cond - uncond)

    return v_cfg


def drop_labels(y: Tensor, p: float, null_class: int,
                generator: torch.Generator | None = None) -> Tensor:
    """Replace each label by the null class with probability p (class dropout for CFG)."""
    if not 0.0 <= p <= 1.0:
        raise ArgumentError(f"p: expected a probability in [0, 1], got {p}")
    drop = torch.rand(y.shape, generator=generator).to(y.device) < p
    return torch.where(drop, torch.full_like(y, null_class), y)


class FlowMatching(nn.Module):
    """The flow-matching recipe for the trainer (`onestep_models.train`): a velocity net v
    trained by the CFM loss, labels dropped to the null class `num_classes` with probability
    `class_dropout` (for classifier-free guidance), sampled by Euler."""

    def __init__(self, v: nn.Module, num_classes: int = 0, class_dropout: float = 0.1,
                 sample_steps: tuple[int, ...] = (1, 128)):
        super().__init__()
        if not 0.0 <= class_dropout <= 1.0:
            raise ArgumentError(f"class_dropout: expected a probability, got {class_dropout}")
        self.v, self.num_classes, self.class_dropout = v, num_classes, class_dropout
        self.sample_steps = tuple(sample_steps)

    def loss(self, x1: Tensor, y: Tensor | None, rng) -> tuple[Tensor, dict[str, Tensor]]:
        x0, t = rng.normal(*x1.shape[1:]).to(x1.dtype), rng.uniform().to(x1.dtype)
        y = rng.drop_labels(y, self.class_dropout, self.num_classes)
        loss = cfm_loss(self.v, x1, y, x0=x0, t=t)
        return loss, {}

    def samplers(self) -> dict[str, Callable[[Tensor, Tensor | None], Tensor]]:
        return {f"flow_euler_{n}step": (lambda x0, y, n=n: euler(self.v, x0, n, y))
                for n in self.sample_steps}
