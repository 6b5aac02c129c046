"""Scoring: the kernel ``Phi^T W Phi`` and its damped solve (:mod:`.kernel`), and the scores of
each checkpoint and their ensemble (:mod:`.scores`), the top-k train rows per target
(:mod:`.top_k`)."""
from .kernel import Kernel, RegularizedInverse, compute_kernel, compute_kernels, kernel_matrix
from .scores import add_checkpoint_scores, model_scores
from .top_k import TopK, top_k

__all__ = ["Kernel", "RegularizedInverse", "compute_kernel", "compute_kernels", "kernel_matrix",
           "model_scores", "add_checkpoint_scores", "TopK", "top_k"]
