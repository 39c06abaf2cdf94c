"""Triton kernels of rmfast, importable after install as ``rmfast.kernels``.

Importing this package needs triton. Under TRITON_INTERPRET=1 (set before the import) the kernels run on
CPU tensors through Triton's interpreter, which the tests use on machines without a GPU.
"""

from .pairwise_loss import pairwise_loss_bwd, pairwise_loss_fwd

__all__ = ["pairwise_loss_fwd", "pairwise_loss_bwd"]
