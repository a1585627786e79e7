"""onestep_kernels: fused operators for Diffusion Transformer blocks.

Importing this package touches no GPU and does not need Triton.
"""

from .dispatch import available_backends, backend_choices, use_backend
from .memory import tune_cpu_allocator
from .ops.attention import attention
from .ops.bias_gelu_tanh import bias_gelu_tanh
from .ops.fused_linear import fused_linear
from .ops.gated_residual_layernorm_modulate import gated_residual_layernorm_modulate
from .ops.layernorm_modulate import layernorm_modulate
from .ops.score_candidates import score_candidates

__version__ = "0.1.0"

__all__ = ["attention", "available_backends", "backend_choices", "bias_gelu_tanh", "fused_linear",
           "gated_residual_layernorm_modulate", "layernorm_modulate", "score_candidates",
           "tune_cpu_allocator", "use_backend"]
