"""What a report needs to know about a method: its display label, its place in tables, the backprop twin
that trains the same network (the denominator of cost ratios) and how the paper table names it.

Everything goes through :func:`method_report_info`, the one place where reporting asks about methods:
it reads the method class's own declaration (``report_label``, ``report_order``, ``bp_twin``,
``paper_names`` class attributes) and falls back, for methods that do not declare them yet, to
:data:`_FALLBACK`. Once every method declares its metadata the fallback table can go.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

#: methods whose order is at least this come after every other configuration (ladder end, references)
TAIL_ORDER = 900


@dataclass(frozen=True)
class MethodReportInfo:
    name: str  # the registered name
    label: str  # display name, e.g. "CAW-Conv"
    order: int  # position in tables (lower first); >= TAIL_ORDER: after every other configuration
    bp_twin: str | None  # the `backprop` recipe that trains the same network; None for backprop itself
    paper_names: tuple[str, ...] = ()  # names of the method in paper_results.csv
    end_to_end: bool = False  # the backprop reference itself (the twin of the others)


# Methods that do not (yet) declare their report metadata on the class.
_FALLBACK: dict[str, tuple[str, int, str | None, tuple[str, ...], bool]] = {
    "caw_conv": ("CAW-Conv", 10, "paper", ("CAW-Conv",), False),
    "cwcomp": ("CwComp", 30, "paper-cwcomp", ("CwComp",), False),
    "cafo": ("CaFo", 40, "paper-cafo", ("CaFo",), False),
    "symba": ("SymBa", 50, "paper-symba", ("SymBa",), False),
    "ff": ("FF", 60, "paper-ff", ("FF",), False),
    "deeperforward": ("DeeperForward", 900, "paper", ("DeeperForward",), False),
    "backprop": ("Backprop", 1000, None, ("Backprop", "BP"), True),
}
UNKNOWN_ORDER = 500
#: the class attributes a method may declare (each overrides the fallback)
DECLARED = ("report_label", "report_order", "bp_twin", "paper_names", "end_to_end")


@functools.cache
def method_report_info(name: str) -> MethodReportInfo:
    """The report metadata of method ``name``; a method that is not registered (rows from another
    version of the suite) gets its name as label and a middle position."""
    cls = None
    try:
        from cawbench.method import get_method

        cls = get_method(name)
    except Exception:  # unknown here, or the method package cannot be imported: report it by name
        cls = None
    label, order, twin, paper, end_to_end = _FALLBACK.get(name, (name, UNKNOWN_ORDER, None, (), False))
    if cls is not None:
        declared = {k: getattr(cls, k) for k in DECLARED if getattr(cls, k, None) is not None}
        label = declared.get("report_label", label)
        order = declared.get("report_order", order)
        twin = declared.get("bp_twin", twin)
        paper = tuple(declared.get("paper_names", paper))
        end_to_end = bool(declared.get("end_to_end", end_to_end))
    return MethodReportInfo(name, str(label), int(order), twin, tuple(paper), end_to_end)


def registered_methods() -> list[str]:
    try:
        from cawbench.method import list_methods

        return list_methods()
    except Exception:
        return sorted(_FALLBACK)


def is_backprop(name: str) -> bool:
    """Whether ``name`` is the end-to-end backprop reference (the twin of the local methods)."""
    return method_report_info(name).end_to_end
