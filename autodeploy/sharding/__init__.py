"""Sharding: plan (``detect``) and apply (``apply_edits``) tensor / expert / batch parallelism on the
exported graph, before weights load. See docs/architecture.md, "Sharding"."""

from .apply import apply_edits
from .detect import ShardingOptions, detect
from .plan import Plan, PlanRow, format_table

__all__ = ["Plan", "PlanRow", "ShardingOptions", "apply_edits", "detect", "format_table"]
