"""The sandboxed expression language of edge conditions, transforms and loop conditions (CONTRACT §5.3).

An expression is parsed with ``ast.parse(mode="eval")`` and compiled, node by node, into nested closures; no
user text ever reaches ``eval``, ``exec`` or ``compile``. Only whitelisted syntax compiles, so the language is
closed: no imports, lambdas, comprehensions, f-strings or method calls; ``a.b`` is a dict key lookup, never
``getattr``; and no name, attribute or key may contain ``__``, the door to every classic escape such as
``().__class__.__bases__[0].__subclasses__()``.

Evaluation is bounded, and every guard runs before the operation it guards: an integer may not grow past
``MAX_INT_BITS``; a value the expression builds (``*``, ``+``, displays, ``str()``, slices, ``list()``,
``sorted()``) may not exceed ``MAX_VALUE_SIZE`` elements + characters, measured deeply where references can be
shared, so that ``[[0] * 999999] * 999999`` (cheap to build, 10**12 to print or encode) is refused before it
exists; and one evaluation may build at most ``MAX_WORK`` in total. Values read from the scope are trusted.
"""

from __future__ import annotations

import ast
import operator
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from .errors import ExpressionError, ExpressionEvalError, json_type

__all__ = ["Expression", "compile_expression"]

MAX_SOURCE_CHARS = 10_000
MAX_NODES = 5_000  # syntax nodes, operators and contexts included
MAX_DEPTH = 100  # keeps our recursive compiler and the closures far from Python's recursion limit
MAX_INT_BITS = 4096
MAX_VALUE_SIZE = 1_000_000  # deep size of one built value (see _size)
MAX_WORK = 10_000_000  # total size built or copied by one evaluation

_ALIASES = {"true": True, "false": False, "null": None}  # JSON spellings, always constants (never scope keys)
_NUMBERS = (int, float)
_SEQUENCES = (str, list, tuple)
_CONTAINERS = (str, list, tuple, set, frozenset, Mapping)
_Fn = Callable[["_Env"], Any]


class _Refused(Exception):
    """A rule or limit hit while evaluating; surfaces as ExpressionEvalError."""


class _Env:
    """Per-evaluation state, so a compiled Expression stays immutable and safe to share between tasks."""

    __slots__ = ("scope", "spent", "sizes")

    def __init__(self, scope: Mapping[str, Any]) -> None:
        self.scope = scope
        self.spent = 0
        # id -> (container, deep size) for containers built so far: an enclosing value adds the size instead of
        # walking again. Holding the container keeps its id from being reused within the evaluation.
        self.sizes: dict[int, tuple[Any, int]] = {}


def _clip(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _brief(value: Any, width: int = 60) -> str:
    return _clip(repr(value), width)


def _size(env: _Env, value: Any, limit: int) -> int:
    """Elements + characters + 64-bit words of big ints, counting a shared reference every time it occurs (that is
    what ``str()``, ``==`` or JSON encoding pay). Iterative, and stops as soon as the count passes ``limit``."""
    total, stack = 0, [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, int):
            total += v.bit_length() >> 6
        elif id(v) in env.sizes:
            total += env.sizes[id(v)][1]
        elif isinstance(v, (list, tuple, set, frozenset)):
            total += len(v)
            if total <= limit:
                stack.extend(v)
        elif isinstance(v, Mapping):
            total += len(v)
            if total <= limit:
                stack.extend(v.keys())
                stack.extend(v.values())
        if total > limit:
            break
    return total


def _reserve(env: _Env, size: int) -> None:
    if size > MAX_VALUE_SIZE:
        raise _Refused(f"the result would exceed {MAX_VALUE_SIZE:,} elements/characters")
    env.spent += size
    if env.spent > MAX_WORK:
        raise _Refused(f"the evaluation builds more than {MAX_WORK:,} elements/characters in total")


def _remember(env: _Env, value: Any, size: int) -> Any:
    env.sizes[id(value)] = (value, size)
    return value


def _built(env: _Env, value: Any) -> Any:
    # Every deep walk is charged right after it, so walking costs at most MAX_WORK + MAX_VALUE_SIZE per evaluation.
    size = _size(env, value, MAX_VALUE_SIZE)
    _reserve(env, size)
    return _remember(env, value, size)


def _each(values: Any) -> Any:
    # Only data is iterated: a foreign iterable (a generator, an object with __getitem__) may never end.
    if not isinstance(values, _CONTAINERS):
        raise _Refused(f"expected an array, object or string, not {json_type(values)}")
    return values


def _number(value: Any) -> Any:
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise _Refused(f"integer result exceeds {MAX_INT_BITS} bits")
    if isinstance(value, complex):
        raise _Refused("complex results are not supported")
    return value


# -- operators: every guard runs BEFORE the operation, since the operation itself is what could hang -------------


def _repeat(env: _Env, seq: Any, count: int) -> Any:
    if count <= 0:
        return seq[:0]
    size = _size(env, seq, MAX_VALUE_SIZE) * count
    _reserve(env, size)
    return _remember(env, seq * count, size)


def _add(env: _Env, a: Any, b: Any) -> Any:
    if isinstance(a, _SEQUENCES) and isinstance(b, _SEQUENCES):
        size = _size(env, a, MAX_VALUE_SIZE)
        size += _size(env, b, MAX_VALUE_SIZE - size)
        _reserve(env, size)
        return _remember(env, operator.add(a, b), size)
    return _number(a + b)


def _mul(env: _Env, a: Any, b: Any) -> Any:
    if isinstance(a, _SEQUENCES) and isinstance(b, int):
        return _repeat(env, a, b)
    if isinstance(b, _SEQUENCES) and isinstance(a, int):
        return _repeat(env, b, a)
    if not (isinstance(a, _NUMBERS) and isinstance(b, _NUMBERS)):  # closed world: no b"x" * 10**9, no numpy
        raise _Refused(f"cannot multiply {json_type(a)} by {json_type(b)}")
    if isinstance(a, int) and isinstance(b, int) and a.bit_length() + b.bit_length() > MAX_INT_BITS + 1:
        raise _Refused(f"integer result exceeds {MAX_INT_BITS} bits")
    return _number(a * b)


def _mod(env: _Env, a: Any, b: Any) -> Any:
    if not (isinstance(a, _NUMBERS) and isinstance(b, _NUMBERS)):  # "%*d" % (10**9, 1) allocates a gigabyte
        raise _Refused("'%' works on numbers only (no string formatting)")
    return _number(a % b)


def _pow(env: _Env, a: Any, b: Any) -> Any:
    # base >= 2**(bits-1), so the result has at least (bits-1)*b bits: refuse 9**9**9 without computing it.
    if isinstance(a, int) and isinstance(b, int) and b > 0 and (abs(a).bit_length() - 1) * b > MAX_INT_BITS:
        raise _Refused(f"integer result exceeds {MAX_INT_BITS} bits")
    return _number(a**b)


_BINOPS: dict[type, Callable[[_Env, Any, Any], Any]] = {
    ast.Add: _add,
    ast.Sub: lambda env, a, b: _number(a - b),
    ast.Mult: _mul,
    ast.Div: lambda env, a, b: a / b,
    ast.FloorDiv: lambda env, a, b: _number(a // b),
    ast.Mod: _mod,
    ast.Pow: _pow,
}
_BITWISE = (ast.BitAnd, ast.BitOr, ast.BitXor, ast.LShift, ast.RShift, ast.MatMult)
_REFUSED_OPS = dict(zip(_BITWISE, "& | ^ << >> @".split(), strict=True))
_COMPARE: dict[type, Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in _each(b),
    ast.NotIn: lambda a, b: a not in _each(b),
    ast.Is: operator.is_,
    ast.IsNot: operator.is_not,
}


# -- functions: pure, positional, fixed arity (checked at compile time) ---------------------------------------------


def _copy(env: _Env, fn: Callable[[Any], list], values: Any) -> list:
    _reserve(env, len(_each(values)))  # a shallow copy cannot amplify, so its length is enough
    return fn(values)


def _round(env: _Env, value: Any, ndigits: Any = None) -> Any:
    if ndigits is None:
        return _number(round(value))
    if isinstance(ndigits, int) and abs(ndigits) > 1000:  # round(5, -10**9) would compute 10**(10**9)
        raise _Refused("round() ndigits must be between -1000 and 1000")
    return _number(round(value, ndigits))


def _str(env: _Env, value: Any) -> str:
    _reserve(env, _size(env, value, MAX_VALUE_SIZE))  # the text is a small multiple of the deep size
    text = str(value)
    _reserve(env, len(text))
    return text


_FUNCTIONS: dict[str, tuple[Callable[..., Any], int, int | None]] = {  # name: (fn(env, *args), min, max args)
    "abs": (lambda env, x: _number(abs(x)), 1, 1),
    "all": (lambda env, x: all(_each(x)), 1, 1),
    "any": (lambda env, x: any(_each(x)), 1, 1),
    "bool": (lambda env, x: bool(x), 1, 1),
    "float": (lambda env, x: float(x), 1, 1),
    "int": (lambda env, x: _number(int(x)), 1, 1),
    "len": (lambda env, x: len(x), 1, 1),
    "list": (lambda env, x: _copy(env, list, x), 1, 1),
    "max": (lambda env, *xs: max(_each(xs[0]) if len(xs) == 1 else xs), 1, None),
    "min": (lambda env, *xs: min(_each(xs[0]) if len(xs) == 1 else xs), 1, None),
    "round": (_round, 1, 2),
    "sorted": (lambda env, x: _copy(env, sorted, x), 1, 1),
    "str": (_str, 1, 1),
    "sum": (lambda env, x: _number(sum(_each(x))), 1, 1),
}

_DISPLAYS: dict[type, Callable[[list], Any]] = {ast.List: lambda items: items, ast.Tuple: tuple, ast.Set: set}
_REFUSED_SYNTAX = {
    ast.Lambda: "lambda is",
    ast.ListComp: "comprehensions are",
    ast.SetComp: "comprehensions are",
    ast.DictComp: "comprehensions are",
    ast.GeneratorExp: "generator expressions are",
    ast.NamedExpr: "':=' is",
    ast.JoinedStr: "f-strings are",
    ast.Starred: "'*' unpacking is",
}


def _text(node: ast.expr) -> str:
    return _clip(ast.unparse(node))  # only on error: unparsing every node at compile time is quadratic


def _item(obj: Any, key: Any, node: ast.expr) -> Any:
    if isinstance(obj, Mapping):
        if isinstance(key, str) and "__" in key:  # computed keys get the same dunder rule as literal ones
            raise _Refused(f"key {_brief(key)} is not allowed")
        try:
            return obj[key]
        except KeyError:
            raise _Refused(f"{_text(node)} has no key {_brief(key)}") from None
    if isinstance(obj, _SEQUENCES):
        return obj[key]
    raise _Refused(f"{_text(node)} is {json_type(obj)}, which cannot be subscripted")


def _is_singleton(node: ast.expr) -> bool:
    # identity, not `in`: 1 == True, and `x is 1` must stay refused
    return (isinstance(node, ast.Constant) and any(node.value is c for c in (None, True, False))) or (
        isinstance(node, ast.Name) and node.id in _ALIASES
    )


class _Compiler:
    """Turns a checked AST into closures ``fn(env) -> value``; ``names`` collects the free names read."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.names: set[str] = set()

    def fail(self, reason: str) -> NoReturn:
        raise ExpressionError(f"invalid expression {_brief(self.source, 100)}: {reason}")

    def parse(self) -> ast.Expression:
        if len(self.source) > MAX_SOURCE_CHARS:
            self.fail(f"longer than {MAX_SOURCE_CHARS:,} characters")
        text = self.source.strip()
        if not text:
            self.fail("empty expression")
        try:
            with warnings.catch_warnings():  # e.g. SyntaxWarning for `x is 1`: our message is the one to show
                warnings.simplefilter("ignore")
                return ast.parse(text, mode="eval")
        except SyntaxError as exc:
            self.fail(f"{exc.msg} at column {exc.offset}" if exc.offset and "\n" not in text else exc.msg)
        except (ValueError, RecursionError, MemoryError) as exc:  # null bytes; parser stack exhaustion
            self.fail(str(exc) or type(exc).__name__)

    def check(self, tree: ast.AST) -> None:
        """Size, depth and dunder rules, iteratively, before the recursive compile could overflow the stack."""
        count, stack = 0, [(tree, 1)]
        while stack:
            node, depth = stack.pop()
            count += 1
            if count > MAX_NODES:
                self.fail(f"too complex (more than {MAX_NODES:,} syntax nodes)")
            if depth > MAX_DEPTH:
                self.fail(f"nested too deeply (more than {MAX_DEPTH} levels)")
            if isinstance(node, ast.Name) and "__" in node.id:
                self.fail(f"name {node.id!r} is not allowed")
            if isinstance(node, ast.Attribute) and "__" in node.attr:
                self.fail(f"attribute {node.attr!r} is not allowed")
            key = node.slice if isinstance(node, ast.Subscript) else None
            if isinstance(key, ast.Constant) and isinstance(key.value, str) and "__" in key.value:
                self.fail(f"key {_brief(key.value)} is not allowed")
            stack.extend((child, depth + 1) for child in reversed(list(ast.iter_child_nodes(node))))

    def compile(self, node: ast.AST) -> _Fn:
        handler = getattr(self, f"_c_{type(node).__name__}", None)
        if handler is None:
            self.fail(f"{_REFUSED_SYNTAX.get(type(node), type(node).__name__ + ' syntax is')} not allowed")
        return handler(node)

    def _c_Constant(self, node: ast.Constant) -> _Fn:
        value = node.value
        if value is not None and not isinstance(value, (bool, int, float, str)):
            self.fail(f"{type(value).__name__} literals are not allowed")
        if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
            self.fail(f"integer literal exceeds {MAX_INT_BITS} bits")
        return lambda env: value

    def _c_Name(self, node: ast.Name) -> _Fn:
        name = node.id
        if name in _ALIASES:
            value = _ALIASES[name]
            return lambda env: value
        self.names.add(name)

        def load(env: _Env) -> Any:
            try:
                return env.scope[name]
            except KeyError:
                raise _Refused(f"name {name!r} is not defined") from None

        return load

    def _c_Attribute(self, node: ast.Attribute) -> _Fn:
        key, base, inner = node.attr, self.compile(node.value), node.value

        def attribute(env: _Env) -> Any:
            obj = base(env)
            if not isinstance(obj, Mapping):  # the whole point: never getattr on a real object
                raise _Refused(
                    f"{_text(inner)}.{key}: attribute access needs an object, not {json_type(obj)}"
                )
            try:
                return obj[key]
            except KeyError:
                raise _Refused(f"{_text(inner)} has no key {key!r}") from None

        return attribute

    def _c_Subscript(self, node: ast.Subscript) -> _Fn:
        base, inner = self.compile(node.value), node.value
        if not isinstance(node.slice, ast.Slice):
            key = self.compile(node.slice)
            return lambda env: _item(base(env), key(env), inner)
        bounds = [
            None if part is None else self.compile(part)
            for part in (node.slice.lower, node.slice.upper, node.slice.step)
        ]

        def sliced(env: _Env) -> Any:
            obj = base(env)
            if not isinstance(obj, _SEQUENCES):
                raise _Refused(f"{_text(inner)} is {json_type(obj)}, which cannot be sliced")
            result = obj[slice(*(None if fn is None else fn(env) for fn in bounds))]
            _reserve(env, len(result))
            return result

        return sliced

    def _c_List(self, node: ast.List | ast.Tuple | ast.Set) -> _Fn:
        items, make = [self.compile(e) for e in node.elts], _DISPLAYS[type(node)]
        return lambda env: _built(env, make([fn(env) for fn in items]))

    _c_Tuple = _c_Set = _c_List

    def _c_Dict(self, node: ast.Dict) -> _Fn:
        if any(k is None for k in node.keys):
            self.fail("'**' unpacking is not allowed")
        pairs = [(self.compile(k), self.compile(v)) for k, v in zip(node.keys, node.values, strict=True) if k]
        return lambda env: _built(env, {k(env): v(env) for k, v in pairs})

    def _c_BoolOp(self, node: ast.BoolOp) -> _Fn:
        parts, is_and = [self.compile(v) for v in node.values], isinstance(node.op, ast.And)

        def boolean(env: _Env) -> Any:  # short-circuits and returns an operand, as Python does
            for fn in parts:
                value = fn(env)
                if bool(value) != is_and:
                    return value
            return value

        return boolean

    def _c_UnaryOp(self, node: ast.UnaryOp) -> _Fn:
        if isinstance(node.op, ast.Invert):
            self.fail("operator '~' is not allowed")
        operand = self.compile(node.operand)
        if isinstance(node.op, ast.Not):
            return lambda env: not operand(env)
        sign = operator.neg if isinstance(node.op, ast.USub) else operator.pos
        return lambda env: _number(sign(operand(env)))

    def _c_BinOp(self, node: ast.BinOp) -> _Fn:
        op = _BINOPS.get(type(node.op))
        if op is None:
            self.fail(f"operator {_REFUSED_OPS.get(type(node.op), '?')!r} is not allowed")
        left, right = self.compile(node.left), self.compile(node.right)
        return lambda env: op(env, left(env), right(env))

    def _c_Compare(self, node: ast.Compare) -> _Fn:
        operands, steps = [node.left, *node.comparators], []
        for i, op in enumerate(node.ops):
            if isinstance(op, (ast.Is, ast.IsNot)) and not (
                _is_singleton(operands[i]) or _is_singleton(operands[i + 1])
            ):
                self.fail("'is' can only compare with None, True or False")
            steps.append((_COMPARE[type(op)], self.compile(operands[i + 1])))
        left = self.compile(node.left)
        if len(steps) == 1:
            ((test, right),) = steps
            return lambda env: test(left(env), right(env))

        def chain(env: _Env) -> Any:  # a < b < c: each operand evaluated once, stop at the first false link
            a = left(env)
            for test, right in steps:
                b = right(env)
                if not test(a, b):
                    return False
                a = b
            return True

        return chain

    def _c_IfExp(self, node: ast.IfExp) -> _Fn:
        test, body, orelse = self.compile(node.test), self.compile(node.body), self.compile(node.orelse)
        return lambda env: body(env) if test(env) else orelse(env)

    def _c_Call(self, node: ast.Call) -> _Fn:
        if isinstance(node.func, ast.Attribute):
            self.fail(f"method calls such as '.{node.func.attr}()' are not allowed")
        if not isinstance(node.func, ast.Name):
            self.fail("only the built-in functions can be called")
        name = node.func.id
        if name not in _FUNCTIONS:
            self.fail(f"function {name!r} is not allowed (available: {', '.join(_FUNCTIONS)})")
        fn, least, most = _FUNCTIONS[name]
        if node.keywords:
            self.fail(f"{name}() takes no keyword arguments")
        if not least <= len(node.args) <= (most or len(node.args)):  # most None: any number
            wanted = least if least == most else f"{least} or more" if most is None else f"{least} to {most}"
            self.fail(f"{name}() takes {wanted} argument(s), not {len(node.args)}")
        args = [self.compile(a) for a in node.args]
        if len(args) == 1:
            (arg,) = args
            return lambda env: fn(env, arg(env))
        return lambda env: fn(env, *[a(env) for a in args])


# Python's own messages name Python types ('NoneType' and 'int'); users write JSON and know JSON's names
_PY_TYPE_NAMES = {"NoneType": "null", "int": "number", "float": "number", "str": "string", "dict": "object",
                  "list": "array", "tuple": "array", "bool": "boolean"}
_PY_TYPE_RE = re.compile(r"'(" + "|".join(_PY_TYPE_NAMES) + r")'")


def _json_names(message: str) -> str:
    return _PY_TYPE_RE.sub(lambda m: f"'{_PY_TYPE_NAMES[m.group(1)]}'", message)


class Expression:
    """A compiled expression. Immutable; equal (and hashed) by source text; pickles as its source."""

    __slots__ = ("source", "names", "_fn")
    source: str
    names: frozenset[str]
    _fn: _Fn

    def __init__(self, source: str) -> None:
        if not isinstance(source, str):
            raise ExpressionError(
                f"invalid expression {_brief(source)}: expected a string, got {json_type(source)}"
            )
        compiler = _Compiler(source)
        tree = compiler.parse()
        compiler.check(tree)
        fn = compiler.compile(tree.body)
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "names", frozenset(compiler.names))
        object.__setattr__(self, "_fn", fn)

    def evaluate(self, scope: Mapping[str, Any]) -> Any:
        """The value of the expression over ``scope``; any failure is an ExpressionEvalError, never anything else."""
        try:
            return self._fn(_Env(scope))
        except _Refused as exc:
            raise ExpressionEvalError(f"cannot evaluate {_brief(self.source, 100)}: {exc}") from None
        except Exception as exc:  # by contract, any runtime failure on user data is an evaluation error
            try:
                detail = f"{type(exc).__name__}: {_json_names(str(exc))}" if str(exc) else type(exc).__name__
            except Exception:  # an exception raised by a scope object may not even print
                detail = type(exc).__name__
            raise ExpressionEvalError(f"cannot evaluate {_brief(self.source, 100)}: {detail[:200]}") from exc

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Expression is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("Expression is immutable")

    def __eq__(self, other: object) -> bool:
        return self.source == other.source if isinstance(other, Expression) else NotImplemented

    def __hash__(self) -> int:
        return hash((Expression, self.source))

    def __reduce__(self) -> tuple[Any, ...]:  # closures do not pickle; recompiling from source is cheap
        return (Expression, (self.source,))

    def __repr__(self) -> str:
        return f"Expression({self.source!r})"


def compile_expression(source: str) -> Expression:
    """Compile ``source``; raises ExpressionError (an InvalidInput) for a syntax error or a forbidden construct."""
    return Expression(source)
