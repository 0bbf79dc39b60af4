"""Relax graph passes of tvm-rmsmp (the design card's "relay_passes"; TVM >= 0.20 has no Relay).

One pass per module. The first three rewrite every model into target-neutral row-group ops
(:mod:`relay_passes.contract` says what those are and checks them); the last two put a
target's own kernels in place, from what the target offers (``schedules.graph_kernels``,
handed to them by the pipeline: the passes never import ``schedules``).
"""

from .fold_row_permutation import FoldRowPermutation
from .fuse_dense_layers import FuseDenseLayers
from .pack_4bit_rows import PackFourBitRows
from .rewrite_row_groups import RewriteRowGroups
from .sparsify_convs import SparsifyConvs
from .sparsify_row_groups import SparsifyRowGroups
from .use_target_kernels import UseTargetKernels

__all__ = ["RewriteRowGroups", "FoldRowPermutation", "PackFourBitRows", "FuseDenseLayers", "UseTargetKernels", "SparsifyRowGroups", "SparsifyConvs"]
