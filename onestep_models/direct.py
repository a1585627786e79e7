"""Direct Models: the flow map from noise x0 to every x_t, learned in one training stage.

Two networks train jointly: a velocity net v(x, t, y) by conditional flow matching, and a
residual net w(x0, t, y) that defines the flow map phi(x0, t) = x0 + t * w(x0, t), trained by a
finite-difference propagation loss. With t' ~ U[dt, 1 - dt]:

    x'_t   = x0 + t' * sg[w(x0, t')]
    target = (t' - dt) / t' * sg[w(x0, t')] + dt / t' * v(x'_t, t')
    loss   = || w(x0, t' + dt) - target ||^2

sg is stop-gradient; the loss trains w only (no gradient reaches v's weights through it). The
target is one explicit Euler step of the ODE that w obeys along t, d/dt (t w) = v(phi, t),
i.e. dw/dt = (v - w) / t, so the fixed point is the flow of v. One-step sampling is
x1 = phi(x0, 1) = x0 + w(x0, 1).

Ablation switches from the paper: `stop_gradient=False` lets gradients flow through both
sg[...] terms (into w, and through v's input, never into v's weights); `parametrization="plain"`
uses phi = x0 + w, whose propagation step is w(t' + dt) = w(t') + dt * v(x0 + w(t'), t').

Time convention: x_t = (1 - t) x0 + t x1, x0 noise (see `onestep_models.flow`), the paper's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from onestep_kernels.errors import ArgumentError
from onestep_models import flow

PARAMETRIZATIONS = ("residual", "plain")
Net = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]


def _check(x0: Tensor, t: Tensor, dt: float, parametrization: str) -> None:
    if parametrization not in PARAMETRIZATIONS:
        raise ArgumentError(f"parametrization: expected one of {PARAMETRIZATIONS}, "
                            f"got {parametrization!r}")
    if not 0.0 < dt < 0.5:
        raise ArgumentError(f"dt: expected a step in (0, 0.5), got {dt}")
    if t.shape != (x0.shape[0],):
        raise ArgumentError(f"t: expected shape ({x0.shape[0]},), got {tuple(t.shape)}")
    if parametrization == "residual":
        message = ("t: the residual parametrization divides by t'; expected t' > 0 (sample it "
                   "from U[dt, 1 - dt])")
        if t.is_cuda:  # an asynchronous device-side assert: no host sync in a training step
            torch._assert_async((t > 0).all(), message)
        elif bool((t <= 0).any()):
            raise ArgumentError(message)


def _weights_frozen(v: Net) -> Net:
    """v with its weights detached, so that a loss through v's input never trains v."""
    if not isinstance(v, nn.Module):
        return v
    state = {name: p.detach() for name, p in v.named_parameters()}
    state.update(v.named_buffers())
    return lambda x, t, y: torch.func.functional_call(v, state, (x, t, y))


def flow_map(w: Net, x0: Tensor, t: Tensor, y: Tensor | None = None,
             parametrization: str = "residual") -> Tensor:
    """phi(x0, t): x0 + t w(x0, t) (residual) or x0 + w(x0, t) (plain)."""
    out = w(x0, t, y)
    return x0 + flow._bcast(t, x0) * out if parametrization == "residual" else x0 + out


def propagation_target(w: Net, v: Net, x0: Tensor, t: Tensor, dt: float,
                       y: Tensor | None = None, *, stop_gradient: bool = True,
                       parametrization: str = "residual") -> Tensor:
    """The regression target for w(x0, t + dt) (see the module docstring)."""
    _check(x0, t, dt, parametrization)
    with torch.set_grad_enabled(torch.is_grad_enabled() and not stop_gradient):
        w_t = w(x0, t, y)
        tb = flow._bcast(t, x0)
        if parametrization == "residual":
            x_t = x0 + tb * w_t
            return (tb - dt) / tb * w_t + dt / tb * _weights_frozen(v)(x_t, t, y)
        return w_t + dt * _weights_frozen(v)(x0 + w_t, t, y)


def propagation_loss(w: Net, v: Net, x0: Tensor, t: Tensor, dt: float,
                     y: Tensor | None = None, *, stop_gradient: bool = True,
                     parametrization: str = "residual") -> Tensor:
    """Mean over all elements of (w(x0, t + dt) - target)^2; `t` holds the (B,) times t'."""
    target = propagation_target(w, v, x0, t, dt, y, stop_gradient=stop_gradient,
                                parametrization=parametrization)
    pred = w(x0, t + dt, y)
    if pred.shape != x0.shape:
        raise ArgumentError(f"w: returned shape {tuple(pred.shape)}, expected {tuple(x0.shape)}")
    return (pred - target).square().mean()


@torch.no_grad()
def sample(w: Net, x0: Tensor, y: Tensor | None = None, parametrization: str = "residual",
           t: float = 1.0) -> Tensor:
    """One network evaluation: phi(x0, t), by default x1 = x0 + w(x0, 1)."""
    return flow_map(w, x0, torch.full((x0.shape[0],), t, dtype=x0.dtype, device=x0.device), y,
                    parametrization)


@dataclass
class DirectConfig:
    """The paper's defaults (the optimiser's lr 5e-5, weight decay 0 and EMA 0.999 live in the
    trainer's config)."""
    dt: float = 0.01
    stop_gradient: bool = True
    parametrization: str = "residual"
    class_dropout: float = 0.1   # label dropout for v (classifier-free guidance)


class DirectModel(nn.Module):
    """v and w side by side; `loss` is one training step's CFM + propagation loss."""

    def __init__(self, v: nn.Module, w: nn.Module, config: DirectConfig | None = None,
                 num_classes: int = 0):
        super().__init__()
        self.v, self.w = v, w
        self.config = config or DirectConfig()
        self.num_classes = num_classes
        _check(torch.zeros(1), torch.ones(1) * 0.5, self.config.dt, self.config.parametrization)

    def loss(self, x1: Tensor, y: Tensor | None, rng) -> tuple[Tensor, dict[str, Tensor]]:
        """CFM loss for v plus the propagation loss for w on a batch of data x1; `rng` is the
        trainer's `BatchRandom`."""
        cfg = self.config
        x0_v, t_v = rng.normal(*x1.shape[1:]), rng.uniform()
        x0, t = rng.normal(*x1.shape[1:]), cfg.dt + (1 - 2 * cfg.dt) * rng.uniform()
        y_v = rng.drop_labels(y, cfg.class_dropout, self.num_classes)
        fm = flow.cfm_loss(self.v, x1, y_v, x0=x0_v.to(x1.dtype), t=t_v.to(x1.dtype))
        prop = propagation_loss(self.w, self.v, x0.to(x1.dtype), t.to(x1.dtype), cfg.dt, y,
                                stop_gradient=cfg.stop_gradient,
                                parametrization=cfg.parametrization)
        return fm + prop, {"cfm": fm.detach(), "propagation": prop.detach()}

    def samplers(self) -> dict[str, Callable[[Tensor, Tensor | None], Tensor]]:
        """w in one step (the Direct Model), and v integrated by Euler in 1 and 128 steps."""
        return {"direct_1step": lambda x0, y: sample(self.w, x0, y, self.config.parametrization),
                "flow_euler_1step": lambda x0, y: flow.euler(self.v, x0, 1, y),
                "flow_euler_128step": lambda x0, y: flow.euler(self.v, x0, 128, y)}
