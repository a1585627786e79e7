"""The Single-Layer Transformer (SLT; "A one-step generation model with a Single-Layer
Transformer: Layer number re-distillation of FreeFlow", arXiv 2601.11630): one shared adaLN-Zero
DiT block looped along depth, read as an ODE whose time is the depth.

A teacher DiT's L layers are L residual steps h_{l+1} = h_l + F_l(h_l). The SLT replaces them
by K applications of ONE block f, application k at depth time tau_k with step Delta_k:

    h_{k+1} = h_k + Delta_k * f(h_k, c, tau_k)

written, as a DiT block is, as two sub-steps (a Lie-Trotter splitting of f = f_attn + f_mlp):

    h <- h + Delta_k * g1_k * attn(LN(h) * (1 + sc1_k) + sh1_k)
    h <- h + Delta_k * g2_k * mlp(LN(h) * (1 + sc2_k) + sh2_k)

The plain Euler step would give both branches the same h_k; the splitting lets the MLP read the
state after attention, as every DiT block does. Both are first-order in Delta_k and differ by
O(Delta_k^2) per step (the commutator of the two fields); at K = L and Delta = 1 the splitting is
exactly a weight-shared DiT. Delta_k is folded into the gates g1, g2 (the modulation is linear
in them), which is what lets the step run inside the fused gated kernels
(onestep_kernels.depth_loop): all K modulations come from one matrix product over the K
conditionings c + e(tau_k), up front.

Design choices (none is published; each is a setting):
- depth time: tau_k = (Delta_0 + ... + Delta_{k-1}) / sum(Delta), in [0, 1), embedded like the
  timestep (its own sinusoidal embedder and MLP, times `time_scale`) and added to the
  conditioning: the block knows where along the depth it is;
- step schedule: "uniform" (Delta_k = 1/K: the depth is a unit interval, so K can change
  between runs without rescaling the gates) or "unit" (Delta_k = 1: a weight-shared DiT);
- the output head (DiT's final layer) reads a learned weighted fusion of the states after P
  evenly spaced applications (`fusion_states`, softmax weights starting at 87% on the last
  state for P = 4; 1 for the last state alone): the states the distillation matches against
  the teacher's intermediate features, so that the head can use what each depth learnt;
- the width defaults to 384 (DiT-S's): one block at DiT-XL/2's 1152 alone is 23.9M
  parameters, while the SLT's 4.3M fits one block of 384 with its embedders, its head and a
  384 -> 1152 projection for feature matching (the distillation's, not the model's).

Conventions as `FlowDiT`'s: t in [0, 1] scaled by `time_scale` before the embedder, labels with
a null class (`num_classes=0`: unconditional), the output the first `in_channels` channels.
The SLT outputs what its teacher's network outputs (a Direct Model's w at t = 1), so that it is
a one-step generator itself.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from onestep_kernels.depth_loop import depth_loop, reference_depth_loop
from onestep_kernels.errors import ArgumentError
from onestep_kernels.layers import DiTBlock, FusedDiTBlock
from onestep_models.dit import (
    FinalLayer,
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    check_labels,
    sincos_2d_pos_embed,
)

SCHEDULES = ("uniform", "unit")


def step_sizes(depth_steps: int, schedule: str = "uniform") -> Tensor:
    """Delta_k for k = 0..K-1 (float64)."""
    if schedule not in SCHEDULES:
        raise ArgumentError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
    value = 1.0 / depth_steps if schedule == "uniform" else 1.0
    return torch.full((depth_steps,), value, dtype=torch.float64)


def default_fusion_states(depth_steps: int) -> int:
    """P by default: 4 states fused (and matched against the teacher), or one per application
    where K < 4."""
    return min(4, depth_steps)


def fusion_depths(depth_steps: int, states: int) -> tuple[int, ...]:
    """The applications after which P = `states` evenly spaced states are taken: after
    K/P, 2K/P, ..., K applications (rounded), as 0-based indices of the application."""
    if not 1 <= states <= depth_steps:
        raise ArgumentError(f"fusion_states: expected 1..{depth_steps} (the depth steps), got "
                            f"{states}")
    return tuple(round(depth_steps * (p + 1) / states) - 1 for p in range(states))


class SingleLayerTransformer(nn.Module):
    """One shared DiT block looped K times along depth (see the module docstring).

    input_size, patch_size, in_channels: the images' side and channels and the patch size.
    hidden_size, num_heads, mlp_ratio: the one block's width, heads and MLP ratio.
    depth_steps: K, the applications of the block (default 28: DiT-XL/2's depth).
    schedule: the steps Delta_k ("uniform": 1/K, "unit": 1).
    fusion_states: P, the states the output head fuses (1: the last one alone; default 4,
        or K where K < 4).
    num_classes, class_dropout_prob: labels (0: unconditional) and whether the null class
        exists (labels are dropped by the recipes, not inside).
    fused: the loop on onestep's fused ops (FusedDiTBlock's parameters; the same state_dict
        as the reference DiTBlock's loop otherwise).
    """

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4,
                 hidden_size: int = 384, num_heads: int = 6, mlp_ratio: float = 4.0,
                 depth_steps: int = 28, schedule: str = "uniform",
                 fusion_states: int | None = None,
                 num_classes: int = 1000, class_dropout_prob: float = 0.1,
                 fused: bool = False, time_scale: float = 1000.0):
        super().__init__()
        if num_classes < 0:
            raise ArgumentError(f"num_classes: expected >= 0 (0 = unconditional), got "
                                f"{num_classes}")
        if isinstance(depth_steps, bool) or not isinstance(depth_steps, int) or depth_steps < 1:
            raise ArgumentError(f"depth_steps: expected an int >= 1, got {depth_steps!r}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = in_channels
        self.num_classes, self.fused, self.time_scale = num_classes, fused, float(time_scale)
        self.depth_steps, self.schedule = depth_steps, schedule
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.tau_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = (LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
                           if num_classes > 0 else None)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size),
                                      requires_grad=False)
        self.block = (FusedDiTBlock if fused else DiTBlock)(hidden_size, num_heads, mlp_ratio)
        self.fusion = fusion_depths(depth_steps, fusion_states or default_fusion_states(depth_steps))
        # (with one state there is nothing to weigh: no parameter that would get no gradient)
        self.fusion_logits = (nn.Parameter(torch.zeros(len(self.fusion)))
                              if len(self.fusion) > 1 else None)
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, fused)
        steps = step_sizes(depth_steps, schedule)
        tau = torch.cat([steps.new_zeros(1), steps.cumsum(0)[:-1]]) / steps.sum()
        # derived from the settings, so not in the state_dict (K is a per-run setting)
        self.register_buffer("steps", steps.float(), persistent=False)
        self.register_buffer("depth_time", tau.float(), persistent=False)
        # The depth times' sinusoidal features, (K, 256), computed once in fp32: constants, so
        # a forward does not rebuild them, and a bf16 copy of the model holds them rounded to
        # bf16 (as the MLP reads them) rather than embedding depth times rounded to bf16 first
        # (1000 * 3/8 = 375 is 376 in bf16).
        self.register_buffer("_tau_frequencies", TimestepEmbedder.timestep_embedding(
            tau.float() * self.time_scale, self.tau_embedder.frequency_embedding_size),
            persistent=False)
        # (K, 1, 6 D): what each application's modulation is multiplied by, Delta_k on the two
        # gates' columns and 1 on the shifts' and scales'
        gates = torch.tensor([0, 0, 1, 0, 0, 1], dtype=torch.bool).repeat_interleave(hidden_size)
        self.register_buffer("_modulation_scale", torch.where(
            gates, steps.float()[:, None], 1.0)[:, None], persistent=False)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation (adaLN-Zero: the block starts as the identity, the head at zero),
        the depth-time embedder like the timestep's, the fusion weighted to the last state."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        grid = int(self.x_embedder.num_patches ** 0.5)
        self.pos_embed.data.copy_(sincos_2d_pos_embed(self.pos_embed.shape[-1], grid)[None])
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for embedder in (self.t_embedder, self.tau_embedder):
            nn.init.normal_(embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(embedder.mlp[2].weight, std=0.02)
        nn.init.zeros_(self.block.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        if self.fusion_logits is not None:
            with torch.no_grad():  # softmax weight exp(3)/(exp(3) + P - 1) on the last state
                self.fusion_logits.zero_()
                self.fusion_logits[-1] = 3.0

    # ---- the forward ---------------------------------------------------------------------

    def conditioning(self, t: Tensor, y: Tensor | None) -> Tensor:
        """c = e(t) + e(y), (B, D), t already scaled."""
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            if y is None or y.shape != t.shape:
                raise ArgumentError(f"y: expected ({t.shape[0]},) labels for a "
                                    f"class-conditional SLT, got "
                                    f"{None if y is None else tuple(y.shape)}")
            check_labels(y, self.y_embedder, self.num_classes)
            c = c + self.y_embedder(y, False)
        return c

    def depth_embeddings(self) -> Tensor:
        """e(tau_k), the K applications' depth-time embeddings, (K, D)."""
        mlp = self.tau_embedder.mlp
        return mlp(self._tau_frequencies.to(mlp[0].weight.dtype))

    def modulations(self, c: Tensor) -> Tensor:
        """Every application's adaLN modulation, (K, B, 6 D), from one matrix product over the
        K conditionings c + e(tau_k), the gates scaled by Delta_k."""
        tau = self.depth_embeddings()                                         # (K, D)
        mod = self.block.adaLN_modulation(c.unsqueeze(0) + tau.unsqueeze(1).to(c.dtype))
        return mod * self._modulation_scale.to(mod.dtype)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """x: (B, C, H, W); t: (B,) in [0, 1]; y: (B,) labels (ignored when unconditional)."""
        return self.forward_with_states(x, t, y)[0]

    def forward_with_states(self, x: Tensor, t: Tensor, y: Tensor | None = None,
                            keep=()) -> tuple[Tensor, list[Tensor]]:
        """(the output, the states after the applications `keep`), in one pass."""
        side = self.input_size
        if x.dim() != 4 or x.shape[1:] != (self.in_channels, side, side):
            raise ArgumentError(f"x: expected (B, {self.in_channels}, {side}, {side}), got "
                                f"{tuple(x.shape)}")
        if t.shape != (x.shape[0],):
            raise ArgumentError(f"t: expected shape ({x.shape[0]},), got {tuple(t.shape)}")
        c = self.conditioning(t * self.time_scale, y)
        h = (self.x_embedder(x) + self.pos_embed).contiguous()
        keep = tuple(keep)
        fused_head = len(self.fusion) == 1  # the head reads the last state alone
        head = None
        if fused_head:
            head = self.final_layer.adaLN_modulation(c).chunk(2, dim=1)
        taken = tuple(sorted(set(keep) | (set() if fused_head else set(self.fusion))))
        block = self.block
        if self.fused:
            h, head_input, states = depth_loop(
                h, self.modulations(c), block.attn, block.mlp.fc1, block.mlp.fc2,
                keep=taken, head=head)
        else:
            h, head_input, states = reference_depth_loop(
                h, self.modulations(c), block.attn, block.mlp, keep=taken, head=head)
        by_depth = dict(zip(taken, states))
        if not fused_head:
            weights = self.fusion_logits.softmax(0).to(h.dtype)
            fused = by_depth[self.fusion[0]] * weights[0]
            for w, k in zip(weights[1:], self.fusion[1:]):
                fused = fused + by_depth[k] * w
            out = self.final_layer(fused, c)
        else:
            out = self.final_layer.linear(head_input)
        return self.unpatchify(out)[:, : self.in_channels], [by_depth[k] for k in keep]

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, N, p*p*C) tokens → (B, C, H, W) images, as DiT's."""
        side = int(x.shape[1] ** 0.5)
        return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=side, w=side,
                         p=self.patch_size, q=self.patch_size)


# Named sizes: hidden size, heads, depth steps, patch size. "slt-S" is the default for a
# DiT-XL/2-shaped teacher (about 4.3M parameters with the distillation's projection).
# "slt-screen" is noise screening's (onestep_models.screening), shaped by its time budget:
# patch 4 (64 tokens where the teacher has 256), K = 7 (a quarter of the teacher's 28 layers,
# `DEPTH_FRACTION`), width 360 (5/16 of 1152; 5 heads of 72, the teacher's head size), so that
# 128 candidates cost 0.79 of one DiT-XL/2 sample's FLOPs. "slt-screen-tiny" is the same design
# scaled by the same factors to the digits' `deep` teacher: 4 tokens of its 16, K = 2 of its 8
# layers, width 20 of its 64.
SLT_SIZES: dict[str, dict[str, int]] = {
    "slt-S": {"hidden_size": 384, "num_heads": 6, "depth_steps": 28, "patch_size": 2},
    "slt-tiny": {"hidden_size": 48, "num_heads": 4, "depth_steps": 8, "patch_size": 2},
    "slt-screen": {"hidden_size": 360, "num_heads": 5, "depth_steps": 7, "patch_size": 4},
    "slt-screen-tiny": {"hidden_size": 20, "num_heads": 4, "depth_steps": 2, "patch_size": 4},
}

# The share of the teacher's layers that a size loops by default (1 where it is not listed).
DEPTH_FRACTION = {"slt-screen": 0.25, "slt-screen-tiny": 0.25}


def default_depth_steps(size: str, teacher_layers: int) -> int:
    """K for an SLT of `size` distilled from a teacher of `teacher_layers` layers."""
    return max(1, round(teacher_layers * DEPTH_FRACTION.get(size, 1.0)))


def parameter_count(model: nn.Module) -> int:
    """Trainable parameters (the frozen positional embedding left out)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)




# ---------------------------------------------------------------------------- distillation


class FrozenTeacher:
    """A frozen network a recipe holds outside its module tree: not a parameter or buffer (no
    checkpoint, EMA, optimiser or DDP broadcast ever sees it: at DiT-XL/2 it would add 2.7 GB
    to each), shared, not copied, by the trainer's EMA copy (`copy.deepcopy`), and moved with
    the recipe by the recipe's `_apply`."""

    def __init__(self, net: nn.Module):
        self.net = net.eval().requires_grad_(False)

    def __deepcopy__(self, memo):
        return self


def _teacher_blocks(teacher: nn.Module) -> nn.ModuleList:
    blocks = getattr(teacher, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ArgumentError("teacher: expected a DiT-shaped network (a `blocks` ModuleList)")
    return blocks


def teacher_depths(layers: int, patches: int) -> tuple[int, ...]:
    """The teacher layers after which its P = `patches` matched states are taken: after L/P,
    2L/P, ..., L layers (rounded), as 0-based layer indices."""
    if not 1 <= patches <= layers:
        raise ArgumentError(f"patches: expected 1..{layers} (the teacher's depth), got "
                            f"{patches}")
    return tuple(round(layers * (p + 1) / patches) - 1 for p in range(patches))


def _pool_tokens(states: Tensor, factor: int) -> Tensor:
    """(B, N, D) tokens of a side-s grid averaged over factor x factor cells: the teacher's
    finer tokens on the SLT's coarser patches."""
    if factor == 1:
        return states
    B, N, D = states.shape
    side = int(N ** 0.5)
    grid = states.transpose(1, 2).reshape(B, D, side, side)
    return torch.nn.functional.avg_pool2d(grid, factor).flatten(2).transpose(1, 2)


class SLTDistillation(nn.Module):
    """Layer-number distillation of a deep one-step teacher into a Single-Layer Transformer
    (a recipe for onestep_models.train, data-free by default).

    The teacher is a one-step map x1 = x0 + f(x0, t, y) at a fixed t (`teacher_time`: a Direct
    Model's w at t = 1, a SlimFlow student's v at its ε), frozen and read through forward hooks
    on its blocks (its code is not touched). Per step, on seeded noise x0 and labels (dropped
    to the null class with `class_dropout`, so that the SLT also runs unconditioned, as the
    screening uses it):

    - output alignment (`output_weight`): mean (SLT(x0) - f(x0))^2;
    - depth-patch feature matching (`feature_weight`): the teacher's states after layers L/P,
      2L/P, ..., L against the SLT's after the matching applications (its `fusion` depths),
      through one learned projection from the SLT's width to the teacher's (`projection`),
      the teacher's tokens averaged over the SLT's patch where those are coarser; each patch's
      term is the squared error relative to the teacher state's mean square, per sample and
      then averaged, so that every depth weighs alike whatever its scale (and the loss is a
      mean over samples: DDP's gradient average is then one process's gradient);
    - patch fusion: the SLT's head reads its learned fusion of those P states where the SLT
      was built with fusion_states = P (1: the last state alone, the ablation).

    The cosine similarity of each patch's states (projected SLT, teacher) is logged. `teacher`
    None builds the recipe for sampling (its samplers need only the SLT).
    """

    def __init__(self, student: SingleLayerTransformer, teacher: nn.Module | None, *,
                 num_classes: int = 0, teacher_time: float = 1.0, teacher_width: int,
                 teacher_patch: int, teacher_depth: int, patches: int = 4,
                 output_weight: float = 1.0, feature_weight: float = 1.0,
                 class_dropout: float = 0.1):
        super().__init__()
        self.student, self.num_classes = student, num_classes
        self.teacher_time = float(teacher_time)
        self.output_weight, self.feature_weight = float(output_weight), float(feature_weight)
        self.class_dropout = float(class_dropout)
        if student.patch_size % teacher_patch:
            raise ArgumentError(f"model: the SLT's patch {student.patch_size} is not a multiple "
                                f"of the teacher's {teacher_patch}")
        self.pool = student.patch_size // teacher_patch
        self.student_depths = fusion_depths(student.depth_steps, patches)
        self.teacher_depths = teacher_depths(teacher_depth, patches)
        self.projection = nn.Linear(student.block.hidden_size, teacher_width)
        self._teacher = None
        self._captured: dict[int, Tensor] = {}
        if teacher is not None:
            blocks = _teacher_blocks(teacher)
            if len(blocks) != teacher_depth or blocks[0].hidden_size != teacher_width:
                raise ArgumentError(f"teacher: expected depth {teacher_depth} and width "
                                    f"{teacher_width} (the run's), got {len(blocks)} and "
                                    f"{blocks[0].hidden_size}")
            self._teacher = FrozenTeacher(teacher)
            for layer in self.teacher_depths:
                blocks[layer].register_forward_hook(self._capture(layer))

    def _capture(self, layer: int):
        def hook(module, args, output):
            self._captured[layer] = output
        return hook

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self._teacher is not None:
            self._teacher.net._apply(fn, recurse)
        return self

    def teacher_outputs(self, x0: Tensor, y: Tensor | None) -> tuple[Tensor, list[Tensor]]:
        """(f(x0, t, y), the matched states, pooled to the SLT's tokens), without gradients."""
        if self._teacher is None:
            raise ArgumentError("teacher: this recipe was built for sampling, without its "
                                "teacher")
        t = torch.full((x0.shape[0],), self.teacher_time, dtype=x0.dtype, device=x0.device)
        self._captured.clear()
        with torch.no_grad():
            out = self._teacher.net(x0, t, y)
        states = [_pool_tokens(self._captured[layer], self.pool)
                  for layer in self.teacher_depths]
        self._captured.clear()
        return out, states

    def loss(self, x1: Tensor, y: Tensor | None, rng):
        x0 = rng.normal(*x1.shape[1:]).to(x1.dtype)
        y = rng.drop_labels(y, self.class_dropout, self.num_classes)  # (drawn with or without y)
        target, teacher_states = self.teacher_outputs(x0, y)
        t = torch.full((x0.shape[0],), self.teacher_time, dtype=x0.dtype, device=x0.device)
        out, states = self.student.forward_with_states(x0, t, y, keep=self.student_depths)
        output_term = (out - target).square().mean()
        logs = {"output": output_term.detach()}
        feature_terms = []
        for p, (ours, theirs) in enumerate(zip(states, teacher_states)):
            projected = self.projection(ours)
            error = (projected - theirs).square().flatten(1).mean(1)
            scale = theirs.square().flatten(1).mean(1).clamp_min(1e-12)
            feature_terms.append((error / scale).mean())
            logs[f"cos_{p}"] = torch.nn.functional.cosine_similarity(
                projected.flatten(1), theirs.flatten(1), dim=1).mean().detach()
        feature_term = torch.stack(feature_terms).mean()
        logs["feature"] = feature_term.detach()
        return self.output_weight * output_term + self.feature_weight * feature_term, logs

    def patch_cosines(self, x0: Tensor, y: Tensor | None, batch: int = 256) -> list[float]:
        """Each patch's cosine similarity of the SLT's projected states to the teacher's,
        averaged over the samples x0 (the demo's measure of how far the matching went)."""
        totals = torch.zeros(len(self.teacher_depths), dtype=torch.float64)
        for start in range(0, x0.shape[0], batch):
            xs = x0[start:start + batch]
            ys = None if y is None else y[start:start + batch]
            _, theirs = self.teacher_outputs(xs, ys)
            t = torch.full((xs.shape[0],), self.teacher_time, dtype=xs.dtype, device=xs.device)
            _, ours = self.student.forward_with_states(xs, t, ys, keep=self.student_depths)
            for p, (a, b) in enumerate(zip(ours, theirs)):
                totals[p] += torch.nn.functional.cosine_similarity(
                    self.projection(a).flatten(1), b.flatten(1), dim=1).double().sum().cpu()
        return (totals / x0.shape[0]).tolist()

    def one_step(self, x0: Tensor, y: Tensor | None) -> Tensor:
        """x1 = x0 + SLT(x0, t, y): the SLT's own one-step sample."""
        t = torch.full((x0.shape[0],), self.teacher_time, dtype=x0.dtype, device=x0.device)
        return x0 + self.student(x0, t, y)

    def samplers(self) -> dict:
        return {"slt_1step": self.one_step}


__all__ = ["SLT_SIZES", "FrozenTeacher", "SLTDistillation", "SingleLayerTransformer",
           "fusion_depths", "parameter_count", "step_sizes", "teacher_depths"]
