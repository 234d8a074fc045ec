"""The sandboxed expression language (CONTRACT §5.3): what it computes, what it refuses, and its resource limits."""

from __future__ import annotations

import copy
import os
import pickle
from types import MappingProxyType

import pytest

from flowcraft_cli.errors import ExpressionError, ExpressionEvalError, InvalidInput
from flowcraft_cli.expressions import Expression, compile_expression


def ev(source: str, **scope: object) -> object:
    return compile_expression(source).evaluate(scope)


SCOPE = {
    "result": {"output": {"total": 150, "items": [1, 2, 3]}, "action": "ok"},
    "counter": 2,
    "name": "order-7",
    "items": [3, 1, 2],
    "empty": [],
    "nothing": None,
    "flag": True,
    "ratio": 0.5,
}


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        # literals, including the JSON spellings
        ("1", 1),
        ("-2.5", -2.5),
        ("'text'", "text"),
        ('"a" "b"', "ab"),
        ("True", True),
        ("None", None),
        ("true", True),
        ("false", False),
        ("null", None),
        ("[1, 'a', null]", [1, "a", None]),
        ("(1, 2)", (1, 2)),
        ("()", ()),
        ("{'a': 1, 'b': [true]}", {"a": 1, "b": [True]}),
        ("{1, 2, 2}", {1, 2}),
        # arithmetic
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("7 / 2", 3.5),
        ("7 // 2", 3),
        ("-7 // 2", -4),
        ("7 % 3", 1),
        ("2 ** 10", 1024),
        ("2 ** -1", 0.5),
        ("-counter", -2),
        ("+counter", 2),
        ("counter - 5", -3),
        ("ratio * 4", 2.0),
        ("'ab' + 'cd'", "abcd"),
        ("[1] + [2]", [1, 2]),
        ("(1,) + (2,)", (1, 2)),
        ("'ab' * 3", "ababab"),
        ("3 * [0]", [0, 0, 0]),
        ("'x' * -1", ""),
        ("[1] * 0", []),
        ("'ab' * true", "ab"),
        # comparisons, chained, membership, identity
        ("counter == 2", True),
        ("counter != 2", False),
        ("counter < 3", True),
        ("counter <= 2", True),
        ("counter > 2", False),
        ("counter >= 2", True),
        ("1 < counter < 3", True),
        ("1 < counter > 3", False),
        ("0 <= ratio <= 1 < 2", True),
        ("'ok' in ['ok', 'no']", True),
        ("'x' not in items", True),
        ("'ord' in name", True),
        ("'output' in result", True),
        ("nothing is None", True),
        ("nothing is null", True),
        ("counter is not None", True),
        ("flag is True", True),
        ("None is nothing", True),
        # boolean logic returns operands, as Python does
        ("flag and counter", 2),
        ("empty or 'default'", "default"),
        ("empty and boom", []),
        ("flag or boom", True),
        ("not empty", True),
        ("not flag", False),
        ("counter > 1 and name == 'order-7' and not nothing", True),
        # conditional expression
        ("'big' if result.output.total > 100 else 'small'", "big"),
        ("'big' if counter > 100 else 'small'", "small"),
        ("1 if flag else boom", 1),
        # subscripts, slices, dict attribute access
        ("items[0]", 3),
        ("items[-1]", 2),
        ("items[1:]", [1, 2]),
        ("items[::-1]", [2, 1, 3]),
        ("items[:counter]", [3, 1]),
        ("name[:5]", "order"),
        ("name[0]", "o"),
        ("result['output']['total']", 150),
        ("result.output.total", 150),
        ("result.output['items'][1]", 2),
        ("result.action == 'ok'", True),
        ("{'a': {'b': 1}}.a.b", 1),
        ("(1, 2)[1]", 2),
        # the whitelisted functions
        ("len(items)", 3),
        ("len(name)", 7),
        ("len(result)", 2),
        ("min(items)", 1),
        ("max(items)", 3),
        ("min(4, counter, 9)", 2),
        ("max('a', 'b')", "b"),
        ("sum(items)", 6),
        ("sum([0.5, 1])", 1.5),
        ("abs(-3)", 3),
        ("round(2.567, 1)", 2.6),
        ("round(2.5)", 2),
        ("round(1234, -2)", 1200),
        ("int('42')", 42),
        ("int(3.9)", 3),
        ("float('1.5')", 1.5),
        ("str(12)", "12"),
        ("str([1, null])", "[1, None]"),
        ("bool(empty)", False),
        ("sorted(items)", [1, 2, 3]),
        ("any([0, counter])", True),
        ("all([1, nothing])", False),
        ("list('ab')", ["a", "b"]),
        ("list(result)", ["output", "action"]),
        ("len(sorted(result.output.items)) == 3", True),
        # a key with a single underscore is ordinary (Flowcraft's _outputs, _inputs)
        ("{'_outputs': 1}._outputs", 1),
    ],
)
def test_allowed_constructs(source: str, expected: object) -> None:
    assert compile_expression(source).evaluate(SCOPE) == expected


def test_results_have_the_python_types() -> None:
    assert type(ev("(1, 2)")) is tuple
    assert type(ev("{1}")) is set
    assert type(ev("7 / 7")) is float
    assert ev("1 < 2") is True


def test_evaluation_is_repeatable_and_returns_fresh_containers() -> None:
    expr = compile_expression("[1, x]")
    first = expr.evaluate({"x": 2})
    first.append(3)  # a caller mutating a result must not change the next evaluation
    assert expr.evaluate({"x": 4}) == [1, 4]


def test_attribute_access_works_on_any_mapping() -> None:
    assert ev("m.a", m=MappingProxyType({"a": 1})) == 1


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ("name.upper", "attribute access needs an object, not string"),
        ("items.count", "attribute access needs an object, not array"),
        ("counter.real", "attribute access needs an object, not number"),
        ("nothing.x", "attribute access needs an object, not null"),
        ("result.output.missing", "result.output has no key 'missing'"),
        ("result['nope']", "result has no key 'nope'"),
        ("unknown > 1", "name 'unknown' is not defined"),
        ("len", "name 'len' is not defined"),
        ("nothing > 1", "not supported between instances of 'null' and 'number'"),
        ("name < 1", "not supported"),
        ("{} < {}", "not supported"),
        ("1 / 0", "division by zero"),
        ("1 // 0", "ZeroDivisionError"),
        ("1 % 0", "ZeroDivisionError"),
        ("0 ** -1", "ZeroDivisionError"),
        ("items[10]", "IndexError"),
        ("items['a']", "TypeError"),
        ("counter[0]", "number, which cannot be subscripted"),
        ("result[1:]", "object, which cannot be sliced"),
        ("items[::0]", "ValueError"),
        ("name - 1", "TypeError"),
        ("-name", "TypeError"),
        ("[1] * [2]", "cannot multiply array by array"),
        ("'a' * 1.5", "cannot multiply string by number"),
        ("[1] + 'a'", "TypeError"),
        ("1 in 5", "expected an array, object or string, not number"),
        ("all(counter)", "not number"),
        ("len(counter)", "TypeError"),
        ("int('abc')", "ValueError"),
        ("int(float('nan'))", "ValueError"),
        ("float('1e999') > 1 and int(float('inf'))", "OverflowError"),
        ("10.0 ** 400", "OverflowError"),
        ("max([])", "ValueError"),
        ("sorted([1, 'a'])", "TypeError"),
        ("sum(['a'])", "TypeError"),
        ("{[1]}", "unhashable"),
        ("(-8) ** 0.5", "complex results are not supported"),
        ("'%s' % counter", "'%' works on numbers only"),
        ("b % 2", "'%' works on numbers only"),
        ("b * 10**9", "cannot multiply bytes by number"),
        ("result[key]", "key '__class__' is not allowed"),
        ("result['out' + '__']", "key 'out__' is not allowed"),
    ],
)
def test_runtime_errors_are_expression_eval_errors(source: str, fragment: str) -> None:
    expr = compile_expression(source)
    with pytest.raises(ExpressionEvalError) as info:
        expr.evaluate({**SCOPE, "key": "__class__", "b": b"%*d"})
    assert fragment in str(info.value)
    assert str(info.value).startswith("cannot evaluate ")


def test_eval_error_is_not_an_invalid_input() -> None:
    # a runtime failure counts as false for a condition; it must not look like a bad blueprint (exit 2)
    assert not issubclass(ExpressionEvalError, InvalidInput)
    assert issubclass(ExpressionError, InvalidInput)


@pytest.mark.parametrize(
    ("source", "names"),
    [
        ("result.output.total > 100", {"result"}),
        ("context['x']", {"context"}),
        ("counter < 2", {"counter"}),
        ("len(items) > limit", {"items", "limit"}),
        ("max(a, b) if c else d[e]", {"a", "b", "c", "d", "e"}),
        ("x is null or y == true and not false", {"x", "y"}),
        ("[a, {b: c}, (d,), {e}]", {"a", "b", "c", "d", "e"}),
        ("input.items[start:end:step]", {"input", "start", "end", "step"}),
        ("len + 1", {"len"}),  # not called, so a scope lookup
        ("1 + 2", set()),
    ],
)
def test_names_are_the_free_names_read(source: str, names: set[str]) -> None:
    expr = compile_expression(source)
    assert expr.names == frozenset(names)
    assert isinstance(expr.names, frozenset)


class Tripwire:
    """A scope value that records any attribute, call or item access made on it."""

    touched: list[str] = []

    def __getattr__(self, name: str) -> object:
        Tripwire.touched.append(name)
        return self

    def __call__(self, *args: object) -> object:
        Tripwire.touched.append("__call__")
        return self

    def __getitem__(self, key: object) -> object:
        Tripwire.touched.append("__getitem__")
        return self


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("__import__('os').system('id')", "name '__import__' is not allowed"),
        ("().__class__.__bases__[0].__subclasses__()", "attribute '__"),
        ("x.__class__", "attribute '__class__' is not allowed"),
        ("x['__class__']", "key '__class__' is not allowed"),
        ("__builtins__", "name '__builtins__' is not allowed"),
        ("getattr(x, '__cla' + 'ss__')", "function 'getattr' is not allowed"),
        ("open('/etc/passwd')", "function 'open' is not allowed"),
        ("eval('1')", "function 'eval' is not allowed"),
        ("type(x)", "function 'type' is not allowed"),
        ("x()", "function 'x' is not allowed"),
        ("x.foo()", "method calls such as '.foo()' are not allowed"),
        ("'a'.upper()", "method calls"),
        ("x[0]()", "only the built-in functions can be called"),
        ("(lambda: 1)()", "only the built-in functions can be called"),
        ("lambda: 1", "lambda is not allowed"),
        ("[x for x in y]", "comprehensions are not allowed"),
        ("{x for x in y}", "comprehensions are not allowed"),
        ("{x: 1 for x in y}", "comprehensions are not allowed"),
        ("any(x for x in y)", "generator expressions are not allowed"),
        ("(y := 1)", "':=' is not allowed"),
        ("f'{x}'", "f-strings are not allowed"),
        ("[*x]", "'*' unpacking is not allowed"),
        ("max(*x)", "'*' unpacking is not allowed"),
        ("{**x}", "'**' unpacking is not allowed"),
        ("sorted(x, key=len)", "sorted() takes no keyword arguments"),
        ("max(**x)", "max() takes no keyword arguments"),
        ("len()", "len() takes 1 argument(s), not 0"),
        ("round(1, 2, 3)", "round() takes 1 to 2 argument(s), not 3"),
        ("max()", "max() takes 1 or more argument(s), not 0"),
        ("x is 1", "'is' can only compare with None, True or False"),
        ("x is y", "'is' can only compare with None, True or False"),
        ("1 << 5", "operator '<<' is not allowed"),
        ("1 | 2", "operator '|' is not allowed"),
        ("~1", "operator '~' is not allowed"),
        ("b'x'", "bytes literals are not allowed"),
        ("1j", "complex literals are not allowed"),
        ("...", "ellipsis literals are not allowed"),
        ("x[1:2, 3]", "Slice syntax is not allowed"),
        ("import os", "invalid syntax"),
        ("x = 1", "invalid syntax"),
        ("1; 2", "invalid syntax"),
        ("a >", "invalid syntax"),
        ("await x", "not allowed"),
        ("", "empty expression"),
        ("   ", "empty expression"),
        ("1\0", "null bytes"),
    ],
)
def test_forbidden_constructs_are_refused_at_compile_time(
    source: str, reason: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[object] = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a))
    with pytest.raises(ExpressionError) as info:
        compile_expression(source)
    assert reason in str(info.value)
    assert str(info.value).startswith("invalid expression ")
    assert calls == []


def test_refusal_message_names_the_expression_and_the_reason() -> None:
    with pytest.raises(ExpressionError) as info:
        compile_expression("__import__('os')")
    assert str(info.value) == "invalid expression \"__import__('os')\": name '__import__' is not allowed"


def test_objects_in_scope_are_never_touched() -> None:
    # attribute access is a dict lookup: a non-mapping object is refused before anything is read from it
    Tripwire.touched.clear()
    for source in ("x.anything", "x.system", "x[0]", "x['k']", "x[1:2]"):
        with pytest.raises(ExpressionEvalError):
            ev(source, x=Tripwire())
    assert Tripwire.touched == []


@pytest.mark.parametrize(
    "source",
    [
        "9**9**9**9",
        "9**9**9",
        "2**4096",
        "3**10000",
        "10**5000",
        "(2**4000) * (2**4000)",
        "-(2**4095) * 4",
        "int('9' * 4000)",
        "sum([2**4095, 2**4095])",
        "'a' * 10**10",
        "10**10 * 'a'",
        "'a' * 1000001",
        "[1] * 10**7",
        "(1,) * 10**7",
        "[[1] * 999999] * 999999",
        "[['x' * 999999]] * 2",
        "[2**4000] * 999999",
        "str([[1] * 1000] * 1000)",
        "'a' * 999999 + 'a' * 999999",
        "[0] * 999999 + [0] * 2",
        "[[0] * 999999, [0] * 999999]",
        "{'k': 'v' * 999999, 'k2': 'v' * 999999}",
        "round(5, -10**9)",
        "'%*d' % (10**9, 1)",
        "len('a' * 900000) + len('a' * 900000) + len('a' * 900000) + len('a' * 900000) + len('a' * 900000)"
        " + len('a' * 900000) + len('a' * 900000) + len('a' * 900000) + len('a' * 900000) + len('a' * 900000)"
        " + len('a' * 900000) + len('a' * 900000)",
    ],
)
def test_resource_limits_raise_instead_of_hanging(source: str) -> None:
    with pytest.raises(ExpressionEvalError):
        ev(source)


def test_limits_are_inclusive() -> None:
    assert ev("len('a' * 1000000)") == 1_000_000
    assert ev("len([0] * 1000000)") == 1_000_000
    assert ev("2**4095 > 0") is True
    assert ev("9**9") == 387420489
    assert ev("2 ** -10**6") == 0.0


def test_large_scope_values_are_read_not_copied() -> None:
    big = list(range(2_000_000))
    assert ev("len(big) > 10 and big[-1] == 1999999 and 5 in big", big=big) is True


@pytest.mark.parametrize(
    "source",
    [
        "x" * 10_001,
        "[" + "1," * 5_000 + "]",
        "-" * 150 + "1",
        "not " * 150 + "x",
        "-" * 2_000 + "1",
        "+".join(["a"] * 3_000),
        "a" + ".b" * 200,
        "(" * 300 + "1" + ")" * 300,
        "[" * 300 + "]" * 300,
        "9" * 5_000,
        "0x" + "f" * 2000,
    ],
    ids=lambda source: f"{source[:12]}...{len(source)}",
)
def test_oversized_sources_are_expression_errors_not_crashes(source: str) -> None:
    with pytest.raises(ExpressionError):
        compile_expression(source)


def test_nesting_within_the_limit_compiles_and_runs() -> None:
    assert ev("-" * 40 + "1") == 1
    assert ev("+".join(["1"] * 40)) == 40
    assert ev("a" + ".b" * 40, a=_nest(40)) == "leaf"


def _nest(depth: int) -> object:
    value: object = "leaf"
    for _ in range(depth):
        value = {"b": value}
    return value


def test_evaluate_raises_only_expression_eval_errors() -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise ValueError("cannot print")

    class Hostile:
        def __bool__(self) -> bool:
            raise RuntimeError("no truth")

        def __lt__(self, other: object) -> bool:
            raise Unprintable

        def __eq__(self, other: object) -> bool:
            raise KeyError("eq")

        __hash__ = object.__hash__

        def __len__(self) -> int:
            raise MemoryError

    sources = [
        "x", "x.a", "x[0]", "x['a']", "x[1:]", "not x", "x and 1", "1 if x else 2", "x == 1", "x < 1", "x in x",
        "len(x)", "sorted(x)", "str(x)", "int(x)", "float(x)", "abs(x)", "round(x)", "round(1.5, x)", "sum(x)",
        "min(x)", "max(x)", "any(x)", "all(x)", "list(x)", "bool(x)", "-x", "x + x", "x * x", "x ** x", "x / x",
        "x // x", "x % x", "x * 10**9", "[x] * 10**9", "{x: x}", "{x}", "(x,)", "x.a.b.c", "'%s' % x", "[x][x]",
    ]  # fmt: skip
    values = [
        None, True, 0, -1, 2**4000, 1.5, float("nan"), float("inf"), "", "a", "__class__", [], [1, "a"], (), {},
        {"a": 1}, {1, 2}, {"a": {"b": None}}, Hostile(), object(), b"x", 1j, ..., Tripwire(), [[]] * 10,
    ]  # fmt: skip
    outcomes = 0
    for source in sources:
        expr = compile_expression(source)
        for value in values:
            try:
                expr.evaluate({"x": value})
            except ExpressionEvalError:
                outcomes += 1
    assert outcomes > 0
    for scope in (None, [], 5, "x"):
        with pytest.raises(ExpressionEvalError):
            compile_expression("x").evaluate(scope)  # type: ignore[arg-type]


def test_expression_object() -> None:
    expr = compile_expression("result.output.total > 100")
    assert isinstance(expr, Expression)
    assert expr.source == "result.output.total > 100"
    assert repr(expr) == "Expression('result.output.total > 100')"
    assert expr == Expression("result.output.total > 100") and expr != compile_expression("1")
    assert len({expr, compile_expression("result.output.total > 100")}) == 1
    with pytest.raises(AttributeError):
        expr.source = "1"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        expr.names = frozenset()  # type: ignore[misc]
    for clone in (pickle.loads(pickle.dumps(expr)), copy.deepcopy(expr)):
        assert clone == expr and clone.names == expr.names
        assert clone.evaluate({"result": {"output": {"total": 101}}}) is True


def test_source_is_kept_verbatim_and_whitespace_is_tolerated() -> None:
    expr = compile_expression("  counter < 2\n")
    assert expr.source == "  counter < 2\n"
    assert expr.evaluate({"counter": 1}) is True
    assert ev("(1 +\n 2)") == 3


@pytest.mark.parametrize("source", [None, 1, True, ["x"]])
def test_non_string_source_is_an_expression_error(source: object) -> None:
    with pytest.raises(ExpressionError, match="expected a string"):
        compile_expression(source)  # type: ignore[arg-type]


def test_aliases_are_constants_even_if_the_scope_has_the_key() -> None:
    assert ev("null", null=1) is None
    assert compile_expression("true or false or null").names == frozenset()
