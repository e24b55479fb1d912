"""Decoding GFP flags the way the running kernel prints them.

GFP bit numbers change between kernel versions, so the names and masks are read from the kmalloc
tracepoint's own `print fmt` (its __print_flags table) at run time, and decoded like the kernel's
__print_flags: in table order, a name is emitted when all its bits are set, and those bits are cleared.
"""

from __future__ import annotations

import ast
import operator
import re

_ENTRY = re.compile(r"\{\s*\(\s*unsigned long\s*\)\s*(.*?)\s*,\s*\"([A-Za-z0-9_]+)\"\s*\}")
_CAST = re.compile(r"\(\s*(?:gfp_t|unsigned long|unsigned int|__force gfp_t)\s*\)")
_ULONG = re.compile(r"\b(0x[0-9a-fA-F]+|\d+)[uUlL]+\b")
_OPS = {
    ast.BitOr: operator.or_,
    ast.BitAnd: operator.and_,
    ast.LShift: operator.lshift,
    ast.RShift: operator.rshift,
    ast.Add: operator.add,
}


def _eval_const(expr: str) -> int:
    """Evaluate a C integer constant expression made of | & ~ << >> + and parentheses."""
    text = _ULONG.sub(r"\1", _CAST.sub("", expr))
    tree = ast.parse(text, mode="eval")

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Invert):
            return ~ev(node.operand) & 0xFFFFFFFFFFFFFFFF
        if isinstance(node, ast.BinOp):
            a, b = ev(node.left), ev(node.right)
            op = _OPS.get(type(node.op))
            if op is not None and not (isinstance(node.op, ast.LShift) and b > 63):
                return op(a, b) & 0xFFFFFFFFFFFFFFFF
        raise ValueError(f"unsupported constant expression: {expr!r}")

    return ev(tree)


def parse_gfp_table(print_fmt: str) -> list[tuple[int, str]]:
    """(mask, name) pairs in the print fmt's order; entries that cannot be read are skipped."""
    start = print_fmt.find("__print_flags(REC->gfp_flags")
    if start < 0:
        return []
    table: list[tuple[int, str]] = []
    for match in _ENTRY.finditer(print_fmt, start):
        try:
            mask = _eval_const(match.group(1))
        except (ValueError, SyntaxError):
            continue
        if mask:
            table.append((mask, match.group(2)))
    return table


def decode_gfp(flags: int, table: list[tuple[int, str]]) -> str:
    """ "GFP_KERNEL|__GFP_ZERO" style text; unknown leftover bits are shown in hex; 0 is "none"."""
    if flags == 0:
        return "none"
    if not table:
        return hex(flags)
    names = []
    rest = flags
    for mask, name in table:
        if rest and (rest & mask) == mask:
            names.append(name)
            rest &= ~mask
    if rest:
        names.append(hex(rest))
    return "|".join(names)
