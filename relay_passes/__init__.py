"""Relax graph passes of tvm-rmsmp (the design card's "relay_passes"; TVM >= 0.20 has no Relay).

One pass per module; they rewrite into target-neutral row-group ops and never import
``schedules``.
"""

from .fold_row_permutation import FoldRowPermutation
from .pack_4bit_rows import PackFourBitRows
from .rewrite_row_groups import RewriteRowGroups

__all__ = ["RewriteRowGroups", "FoldRowPermutation", "PackFourBitRows"]
