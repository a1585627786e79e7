"""One module per fused operator; each holds its reference, kernels and registration."""

from . import attention as attention_op
from . import bias_gelu_tanh as bias_gelu_tanh_op
from . import fused_linear as fused_linear_op
from . import gated_residual_layernorm_modulate as gated_residual_layernorm_modulate_op
from . import layernorm_modulate as layernorm_modulate_op
from .compile_cache import tag_compile_caches

# Modules whose triton_configs() the sm_80/sm_90 compile check (onestep_kernels.aot) walks.
OP_MODULES = (layernorm_modulate_op, gated_residual_layernorm_modulate_op, bias_gelu_tanh_op,
              attention_op, fused_linear_op)

tag_compile_caches()  # compiled graphs of other versions of these ops stay apart

__all__ = ["OP_MODULES", "attention_op", "bias_gelu_tanh_op", "fused_linear_op",
           "gated_residual_layernorm_modulate_op", "layernorm_modulate_op"]
