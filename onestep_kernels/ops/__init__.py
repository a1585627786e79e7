"""One module per fused operator; each holds its reference, kernels, backend records and spec.

Importing this package declares every op (`onestep_kernels.dispatch.OPS`): every list of ops
(the resolver's, the compile check's, the README's table, the GPU pass's rows, the tests'
matrices) is read from there. A new op is one more import here.
"""

from . import attention as attention_op
from . import bias_gelu_tanh as bias_gelu_tanh_op
from . import fused_linear as fused_linear_op
from . import gated_residual_layernorm_modulate as gated_residual_layernorm_modulate_op
from . import layernorm_modulate as layernorm_modulate_op
from . import score_candidates as score_candidates_op

__all__ = ["attention_op", "bias_gelu_tanh_op", "fused_linear_op",
           "gated_residual_layernorm_modulate_op", "layernorm_modulate_op", "score_candidates_op"]
