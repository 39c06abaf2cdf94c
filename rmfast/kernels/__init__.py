"""Triton kernels of rmfast, importable after install as ``rmfast.kernels``.

Importing this package needs triton. Under TRITON_INTERPRET=1 (set before the import) the kernels run on
CPU tensors through Triton's interpreter, which the tests use on machines without a GPU.
``*_op`` are the same launchers as ``torch.ops.rmfast.triton_*`` custom ops, traceable by torch.compile.
"""

from .attribute_head import (
    attribute_head_fwd,
    attribute_head_fwd_op,
    attribute_head_hidden_grad,
    attribute_head_hidden_grad_op,
)
from .plackett_luce import plackett_luce_fwd, plackett_luce_fwd_op
from .pairwise_loss import (
    pairwise_loss_fwd,
    pairwise_loss_fwd_op,
    pairwise_loss_hidden_grad,
    pairwise_loss_hidden_grad_op,
)

__all__ = ["pairwise_loss_fwd", "pairwise_loss_hidden_grad", "pairwise_loss_fwd_op", "pairwise_loss_hidden_grad_op",
           "attribute_head_fwd", "attribute_head_hidden_grad", "attribute_head_fwd_op", "attribute_head_hidden_grad_op",
           "plackett_luce_fwd", "plackett_luce_fwd_op"]
