"""What a report needs to know about a method: its display label, its place in tables, the backprop twin
that trains the same network (the denominator of cost ratios) and how the paper table names it.

Everything goes through :func:`method_report_info`, the one place where reporting asks about methods. Each
method declares its metadata in its own file (``report_label``, ``report_order``, ``bp_twin``,
``paper_names``, ``end_to_end`` on its :class:`cawbench.method.Method`); reporting holds no list of method
names. Defined in :mod:`cawbench.method` (the harness) and re-exported here.
"""

from __future__ import annotations

from cawbench.method import (
    TAIL_ORDER,
    UNKNOWN_ORDER,
    MethodReportInfo,
    list_methods,
    method_report_info,
)

__all__ = [
    "TAIL_ORDER", "UNKNOWN_ORDER", "MethodReportInfo", "is_backprop", "method_report_info",
    "registered_methods",
]  # fmt: skip


def registered_methods() -> list[str]:
    return list_methods()


def is_backprop(name: str) -> bool:
    """Whether ``name`` is the end-to-end backprop reference (the twin of the local methods)."""
    return method_report_info(name).end_to_end
