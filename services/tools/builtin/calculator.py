"""calculator: arithmetic on a parsed expression tree (no eval, no names beyond a fixed list).

The expression is parsed with `ast` and evaluated node by node: numbers, + - * / // %
and ** (also written ^), parentheses, and a fixed set of math functions and constants.
Sizes are bounded (expression length, node count, exponent, integer size) so no input
can make it run long or use much memory.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Any

from services.tools.core import CallContext, Tool, ToolError, ToolSpec

MAX_CHARS = 500
MAX_NODES = 200
MAX_INT_BITS = 4096

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS: dict[str, tuple[Callable[..., Any], int, int]] = {  # name: (function, min args, max args)
    "abs": (abs, 1, 1), "round": (round, 1, 2), "min": (min, 1, 20), "max": (max, 1, 20),
    "sqrt": (math.sqrt, 1, 1), "exp": (math.exp, 1, 1), "log": (math.log, 1, 2), "log10": (math.log10, 1, 1),
    "log2": (math.log2, 1, 1), "sin": (math.sin, 1, 1), "cos": (math.cos, 1, 1), "tan": (math.tan, 1, 1),
    "asin": (math.asin, 1, 1), "acos": (math.acos, 1, 1), "atan": (math.atan, 1, 1),
    "floor": (math.floor, 1, 1), "ceil": (math.ceil, 1, 1), "hypot": (math.hypot, 1, 20),
}
_CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau}

SCHEMA = {
    "type": "object",
    "properties": {
        "expression": {
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_CHARS,
            "description": "Arithmetic expression, e.g. '(1250 * 0.15) + 3^2' or 'sqrt(2) * pi'.",
        }
    },
    "required": ["expression"],
    "additionalProperties": False,
}


def _check_int(value: Any) -> Any:
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise ToolError("the result is too large")
    if isinstance(value, float) and not math.isfinite(value):
        raise ToolError("the result is not a finite number")
    return value


def _power(base: Any, exponent: Any) -> Any:
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0:
        if base not in (-1, 0, 1) and max(base.bit_length(), 1) * exponent > MAX_INT_BITS:
            raise ToolError("the result is too large")
    elif abs(exponent) > 10_000:
        raise ToolError("the exponent is too large")
    result = base**exponent
    if isinstance(result, complex):
        raise ToolError("the result is a complex number")
    return result


def _eval(node: ast.AST) -> Any:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp):
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            return _check_int(_power(left, right))
        op = _BINARY.get(type(node.op))
        if op is None:
            raise ToolError(f"operator {type(node.op).__name__} is not supported")
        return _check_int(op(left, right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
        entry = _FUNCTIONS.get(node.func.id)
        if entry is None:
            raise ToolError(f"unknown function {node.func.id!r}; available: {', '.join(sorted(_FUNCTIONS))}")
        fn, low, high = entry
        if not low <= len(node.args) <= high:
            raise ToolError(f"{node.func.id}() takes {low}-{high} arguments")
        return _check_int(fn(*(_eval(a) for a in node.args)))
    if isinstance(node, ast.Call):
        raise ToolError(f"only these functions can be called, by name: {', '.join(sorted(_FUNCTIONS))}")
    if isinstance(node, ast.Name):
        raise ToolError(f"unknown name {node.id!r}; constants: {', '.join(_CONSTANTS)}")
    if isinstance(node, ast.Tuple):
        raise ToolError("write numbers without thousands separators (1000, not 1,000)")
    raise ToolError(f"{type(node).__name__} is not allowed in an arithmetic expression")


def evaluate(expression: str) -> int | float:
    """The value of an arithmetic expression, or `ToolError` saying what is wrong with it."""
    if len(expression) > MAX_CHARS:
        raise ToolError(f"the expression is longer than {MAX_CHARS} characters")
    # '^' means power, as on a calculator (rewritten before parsing so it binds like '**').
    cleaned = expression.strip().replace("^", "**").replace("×", "*").replace("÷", "/").replace("−", "-")
    try:
        tree = ast.parse(cleaned, mode="eval")
    except SyntaxError as exc:
        raise ToolError(f"not a valid expression: {exc.msg}") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise ToolError("the expression is too long")
    try:
        value = _eval(tree)
    except ZeroDivisionError:
        raise ToolError("division by zero") from None
    except (OverflowError, ValueError) as exc:
        raise ToolError(f"math error: {exc}") from None
    except TypeError as exc:
        raise ToolError(f"invalid operands: {exc}") from None
    if isinstance(value, float):
        value = float(f"{value:.12g}")  # 0.1 + 0.2 -> 0.3: binary noise is not shown
        if value.is_integer() and abs(value) < 2**53:
            return int(value)
    return value


class Calculator(Tool):
    spec = ToolSpec(
        name="calculator",
        description=(
            "Evaluates an arithmetic expression: + - * / // % and ^ or ** (power), parentheses, "
            "sqrt, log, exp, sin, cos, tan, abs, round, min, max, floor, ceil, pi, e. Use it for any "
            "calculation, percentage or unit arithmetic instead of computing in your head."
        ),
        parameters=SCHEMA,
        timeout_s=5.0,
    )

    async def run(self, args: dict[str, Any], call: CallContext) -> Any:
        return {"expression": args["expression"], "result": evaluate(args["expression"])}
