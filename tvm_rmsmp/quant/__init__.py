"""The quantization math: schemes and their integer levels, row plans, row assignment rules and
the configuration. Imports numpy and attrs only (neither torch nor TVM)."""

from .assign import register_assign_rule
from .config import DEFAULT_RATIO, HessianConfig, RMSMPConfig, RMSMPWarning, validate_ratio
from .plan import RowPlan, row_counts
from .schemes import Scheme, get_scheme, list_schemes, register_scheme

__all__ = ["Scheme", "get_scheme", "list_schemes", "register_scheme", "RMSMPConfig", "HessianConfig", "DEFAULT_RATIO",
           "validate_ratio", "RMSMPWarning", "RowPlan", "row_counts", "register_assign_rule"]
