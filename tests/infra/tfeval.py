"""A small evaluator of Terraform expressions, for offline checks of the values infra/ sends to Google.

python-hcl2 returns expressions as text (`"${min(local.x + 30, 1800)}"`); the API rules in
tests/infra/constraints.py need their values. This evaluates the subset of the language infra/ uses:
literals and templates (heredocs too), `var.`/`local.`/`each.` references, resource arguments written in
the configuration (`google_cloud_tasks_queue.convert.name`), attribute and index access, arithmetic,
comparisons, `&&`/`||`/`!`, `?:`, object and tuple constructors, `for` expressions, and the functions
listed in FUNCTIONS. Anything else (a computed attribute such as a service's `uri`, an unknown function)
evaluates to UNKNOWN, which propagates like Terraform's unknown values: a check that meets it skips
that one value instead of guessing.

Variables take their defaults; variables without one must be given (`Evaluator(module, {"x": ...})`).
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tests.infra.tfcheck import Block, TfModule, body_items, unquote


class _Unknown:
    """A value not known before apply (or not computable offline)."""

    _instance: _Unknown | None = None

    def __new__(cls) -> _Unknown:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN: Any = _Unknown()


class EvalError(Exception):
    """The expression is malformed for this evaluator (a bug in infra/ or a construct it lacks)."""


# --- tokens ------------------------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<number>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_-]*)
  | (?P<op>==|!=|<=|>=|&&|\|\||=>|\.\.\.|\[\*\]|[-+*/%<>!?:.,()\[\]{}=])
    """,
    re.VERBOSE,
)


@dataclass(frozen=True)
class Token:
    kind: str  # number, ident, op, string, end
    text: str
    parts: tuple[Any, ...] = ()  # for strings: literal pieces and ("expr", text) pieces


def _scan_string(text: str, start: int) -> tuple[tuple[Any, ...], int]:
    """A "quoted template" starting at text[start] == '"': its pieces and the index after it."""
    parts: list[Any] = []
    buf: list[str] = []
    i = start + 1
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            buf.append({"n": "\n", "t": "\t", '"': '"', "\\": "\\", "r": "\r"}.get(nxt, "\\" + nxt))
            i += 2
        elif ch == '"':
            if buf:
                parts.append("".join(buf))
            return tuple(parts), i + 1
        elif text.startswith("$${", i) or text.startswith("%%{", i):
            buf.append(text[i + 1 : i + 3])
            i += 3
        elif text.startswith("${", i):
            if buf:
                parts.append("".join(buf))
                buf = []
            end = _matching_brace(text, i + 1)
            parts.append(("expr", text[i + 2 : end]))
            i = end + 1
        else:
            buf.append(ch)
            i += 1
    raise EvalError(f"unterminated string in {text!r}")


def _matching_brace(text: str, open_at: int) -> int:
    depth = 0
    i = open_at
    while i < len(text):
        ch = text[i]
        if ch == '"':
            _, i = _scan_string(text, i)
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise EvalError(f"unbalanced braces in {text!r}")


def tokenize(text: str) -> list[Token]:
    tokens: list[Token] = []
    i = 0
    while i < len(text):
        if text[i] == '"':
            parts, i = _scan_string(text, i)
            tokens.append(Token("string", "", parts))
            continue
        match = _TOKEN.match(text, i)
        if not match:
            raise EvalError(f"cannot read {text[i : i + 20]!r} in {text!r}")
        i = match.end()
        kind = match.lastgroup or ""
        if kind != "ws":
            tokens.append(Token(kind, match.group(kind)))
    tokens.append(Token("end", ""))
    return tokens


# --- values ------------------------------------------------------------------------------------------------


@dataclass
class ResourceRef:
    """`google_x.name` (or one for_each instance of it): arguments written in the configuration."""

    block: Block
    key: Any = None  # for_each key of an instance, None for the whole resource
    indexed: bool = False


def _known(*values: Any) -> bool:
    return not any(v is UNKNOWN for v in values)


def _number(value: Any) -> Any:
    if value is UNKNOWN:
        return UNKNOWN
    if isinstance(value, bool):
        raise EvalError(f"expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return int(value) if re.fullmatch(r"-?\d+", value) else float(value)
        except ValueError as exc:
            raise EvalError(f"expected a number, got {value!r}") from exc
    raise EvalError(f"expected a number, got {value!r}")


def tf_string(value: Any) -> Any:
    """Terraform's string conversion (tostring, templates)."""
    if value is UNKNOWN:
        return UNKNOWN
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float, str)):
        return str(value)
    raise EvalError(f"cannot convert {value!r} to a string")


def _merge(*maps: Any) -> Any:
    out: dict[str, Any] = {}
    for item in maps:
        if item is UNKNOWN:
            return UNKNOWN
        if item is None:
            continue
        out.update(item)
    return out


def _coalesce(*values: Any) -> Any:
    for value in values:
        if value is UNKNOWN:
            return UNKNOWN
        if value is not None and value != "":
            return value
    raise EvalError("coalesce: no non-null argument")


def _strict(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A function whose result is unknown when any argument is."""

    def wrapped(*args: Any) -> Any:
        if not _known(*args) or any(isinstance(a, (list, dict)) and not _deep_known(a) for a in args):
            return UNKNOWN
        return fn(*args)

    return wrapped


def _deep_known(value: Any) -> bool:
    if value is UNKNOWN:
        return False
    if isinstance(value, dict):
        return all(_deep_known(v) for v in value.values())
    if isinstance(value, list):
        return all(_deep_known(v) for v in value)
    return True


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "min": _strict(lambda *a: min(_number(x) for x in a)),
    "max": _strict(lambda *a: max(_number(x) for x in a)),
    "floor": _strict(lambda x: math.floor(_number(x))),
    "ceil": _strict(lambda x: math.ceil(_number(x))),
    "abs": _strict(lambda x: abs(_number(x))),
    "tostring": lambda x: tf_string(x) if x is not None else None,
    "tonumber": _strict(_number),
    "tobool": _strict(bool),
    "length": _strict(len),
    "keys": _strict(sorted),
    "values": _strict(lambda m: [m[k] for k in sorted(m)]),
    "contains": _strict(lambda c, v: v in c),
    "lookup": lambda m, k, *d: UNKNOWN if not _known(m, k) else (m[k] if k in m else (d[0] if d else UNKNOWN)),
    "merge": _merge,
    "coalesce": _coalesce,
    "concat": _strict(lambda *ls: [x for lst in ls for x in lst]),
    "join": _strict(lambda sep, items: sep.join(tf_string(i) for i in items)),
    "sort": _strict(sorted),
    "toset": _strict(lambda items: sorted(set(items))),
    "tolist": _strict(list),
    "upper": _strict(str.upper),
    "lower": _strict(str.lower),
    "replace": _strict(lambda s, a, b: s.replace(a, b)),
    "trimspace": _strict(str.strip),
    "split": _strict(lambda sep, s: s.split(sep)),
    "startswith": _strict(lambda s, p: s.startswith(p)),
    "endswith": _strict(lambda s, p: s.endswith(p)),
    "format": _strict(lambda f, *a: re.sub(r"%[sd]", "{}", f).format(*(tf_string(x) for x in a))),
    "base64encode": _strict(lambda s: base64.b64encode(s.encode()).decode()),
    "jsonencode": _strict(lambda v: json.dumps(v, separators=(",", ":"))),
    "alltrue": _strict(all),
    "anytrue": _strict(any),
}


# --- the evaluator -----------------------------------------------------------------------------------------


@dataclass
class Evaluator:
    module: TfModule
    variables: dict[str, Any] = field(default_factory=dict)
    _locals: dict[str, Any] = field(default_factory=dict, init=False)
    _resolving: set[str] = field(default_factory=set, init=False)
    _resources: dict[str, Block] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        values: dict[str, Any] = {}
        for name, body in self.module.variables().items():
            if name in self.variables:
                values[name] = self.variables[name]
            elif "default" in body:
                values[name] = self.value(body["default"], {})
            else:
                values[name] = UNKNOWN
        self.variables = values
        self._resources = {b.address: b for b in self.module.resources()}

    # raw python-hcl2 values

    def value(self, raw: Any, scope: dict[str, Any] | None = None) -> Any:
        scope = scope or {}
        if isinstance(raw, bool) or raw is None or isinstance(raw, (int, float)):
            return raw
        if isinstance(raw, list):
            return [self.value(item, scope) for item in raw]
        if isinstance(raw, dict):
            if raw.get("__is_block__"):
                raise EvalError("a block is not a value")
            out = {}
            for key, sub in body_items(raw):
                name = self.template(unquote(key), scope) if key.startswith("${") else unquote(key)
                out[name] = self.value(sub, scope)
            return out
        if isinstance(raw, str):
            if raw.startswith('"') and raw.endswith('"') and len(raw) >= 2:
                inner = raw[1:-1]
                if inner.startswith("<<"):
                    return self._heredoc(inner, scope)
                parts, end = _scan_string(raw, 0)
                if end == len(raw):
                    return self._join(parts, scope)
                return self.template(inner, scope)
            if raw.startswith("${") and _matching_brace(raw, 1) == len(raw) - 1:
                return self.expression(raw[2:-1], scope)
            return self.template(raw, scope)
        raise EvalError(f"unexpected value {raw!r}")

    def template(self, text: str, scope: dict[str, Any]) -> Any:
        parts, _ = _scan_string('"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"', 0)
        return self._join(parts, scope)

    def _heredoc(self, inner: str, scope: dict[str, Any]) -> Any:
        first, _, rest = inner.partition("\n")
        marker = first.lstrip("<-").strip()
        body = rest.rsplit("\n", 1)[0] if rest.rstrip().endswith(marker) else rest
        if first.startswith("<<-"):
            lines = body.split("\n")
            indent = min((len(line) - len(line.lstrip()) for line in lines if line.strip()), default=0)
            body = "\n".join(line[indent:] for line in lines)
        return self.template(body.replace('\\"', '"') + "\n", scope)

    def _join(self, parts: tuple[Any, ...], scope: dict[str, Any]) -> Any:
        if len(parts) == 1 and isinstance(parts[0], tuple):
            # "${x}" alone keeps x's type in Terraform only for unquoted expressions; a quoted one is a string.
            return tf_string(self.expression(parts[0][1], scope))
        pieces = []
        for part in parts:
            piece = tf_string(self.expression(part[1], scope)) if isinstance(part, tuple) else part
            if piece is UNKNOWN:
                return UNKNOWN
            pieces.append(piece)
        return "".join(pieces)

    # expressions

    def expression(self, text: str, scope: dict[str, Any] | None = None) -> Any:
        parser = _Parser(tokenize(text), self, scope or {})
        result = parser.ternary()
        parser.expect("end")
        return result

    def local(self, name: str) -> Any:
        if name in self._locals:
            return self._locals[name]
        locals_ = self.module.locals()
        if name not in locals_:
            raise EvalError(f"undeclared local.{name}")
        if name in self._resolving:
            raise EvalError(f"local.{name} refers to itself")
        self._resolving.add(name)
        try:
            self._locals[name] = self.value(locals_[name], {})
        finally:
            self._resolving.discard(name)
        return self._locals[name]

    def variable(self, name: str) -> Any:
        if name not in self.variables:
            raise EvalError(f"undeclared var.{name}")
        return self.variables[name]

    def resource(self, address: str) -> Any:
        block = self._resources.get(address)
        if block is None:
            return UNKNOWN  # a data source or an undeclared resource: the reference check reports those
        return ResourceRef(block)

    # resources with for_each / count

    def instances(self, block: Block) -> Iterator[tuple[Any, dict[str, Any]]]:
        """(key, scope) of every instance of a resource: one with an empty scope without for_each/count;
        none when the for_each collection is unknown."""
        if "for_each" in block.body:
            collection = self.value(block.body["for_each"], {})
            if collection is UNKNOWN:
                return
            items = collection.items() if isinstance(collection, dict) else ((v, v) for v in collection)
            for key, value in items:
                yield key, {"each": {"key": key, "value": value}}
        elif "count" in block.body:
            count = self.value(block.body["count"], {})
            if count is UNKNOWN:
                return
            for index in range(int(count)):
                yield index, {"count": {"index": index}}
        else:
            yield None, {}

    def argument(self, ref: ResourceRef, name: str) -> Any:
        if name not in ref.block.body or name in ("for_each", "count", "depends_on"):
            return UNKNOWN  # computed (id, uri, ...) or a block
        raw = ref.block.body[name]
        if isinstance(raw, list) and raw and isinstance(raw[0], dict) and raw[0].get("__is_block__"):
            return UNKNOWN
        scope: dict[str, Any] = {}
        if "for_each" in ref.block.body or "count" in ref.block.body:
            if not ref.indexed:
                return UNKNOWN
            for key, instance_scope in self.instances(ref.block):
                if key == ref.key:
                    scope = instance_scope
                    break
            else:
                return UNKNOWN
        return self.value(raw, scope)


class _Parser:
    def __init__(self, tokens: list[Token], ev: Evaluator, scope: dict[str, Any]) -> None:
        self.tokens = tokens
        self.i = 0
        self.ev = ev
        self.scope = scope

    # helpers

    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def at(self, text: str) -> bool:
        return self.tok.kind in ("op", "ident") and self.tok.text == text

    def take(self, text: str) -> bool:
        if self.at(text):
            self.i += 1
            return True
        return False

    def expect(self, text: str) -> Token:
        token = self.tok
        if (text == "end" and token.kind != "end") or (text != "end" and not self.at(text)):
            raise EvalError(f"expected {text!r}, found {token.text or token.kind!r}")
        self.i += 1
        return token

    # precedence climbing: ?: < || < && < == != < < > <= >= < + - < * / % < unary < postfix

    def ternary(self) -> Any:
        condition = self.binary(0)
        if not self.take("?"):
            return condition
        yes = self.ternary()
        self.expect(":")
        no = self.ternary()
        if condition is UNKNOWN:
            return UNKNOWN
        return yes if condition else no

    _LEVELS = (("||",), ("&&",), ("==", "!="), ("<", ">", "<=", ">="), ("+", "-"), ("*", "/", "%"))

    def binary(self, level: int) -> Any:
        if level == len(self._LEVELS):
            return self.unary()
        left = self.binary(level + 1)
        while self.tok.kind == "op" and self.tok.text in self._LEVELS[level]:
            op = self.tok.text
            self.i += 1
            right = self.binary(level + 1)
            left = _apply(op, left, right)
        return left

    def unary(self) -> Any:
        if self.take("!"):
            value = self.unary()
            return UNKNOWN if value is UNKNOWN else not value
        if self.take("-"):
            value = _number(self.unary())
            return UNKNOWN if value is UNKNOWN else -value
        return self.postfix(self.primary())

    def postfix(self, value: Any) -> Any:
        while True:
            if self.take("."):
                name = self.tok.text
                if self.tok.kind not in ("ident", "number"):
                    raise EvalError(f"expected an attribute name after '.', found {name!r}")
                self.i += 1
                value = self._attribute(value, name)
            elif self.take("[*]"):
                value = UNKNOWN
            elif self.at("["):
                self.i += 1
                key = self.ternary()
                self.expect("]")
                value = self._index(value, key)
            else:
                return value

    def _attribute(self, value: Any, name: str) -> Any:
        if value is UNKNOWN:
            return UNKNOWN
        if isinstance(value, ResourceRef):
            return self.ev.argument(value, name)
        if isinstance(value, dict):
            if name not in value:
                raise EvalError(f"no attribute {name!r} in {sorted(value)}")
            return value[name]
        if isinstance(value, list) and name.isdigit():
            return value[int(name)]
        raise EvalError(f"cannot read .{name} of {value!r}")

    def _index(self, value: Any, key: Any) -> Any:
        if value is UNKNOWN or key is UNKNOWN:
            return UNKNOWN
        if isinstance(value, ResourceRef):
            return ResourceRef(value.block, key, indexed=True)
        if isinstance(value, dict):
            if key not in value:
                raise EvalError(f"no key {key!r} in {sorted(value)}")
            return value[key]
        if isinstance(value, list):
            return value[int(_number(key))]
        raise EvalError(f"cannot index {value!r}")

    def primary(self) -> Any:
        token = self.tok
        if token.kind == "number":
            self.i += 1
            return _number(token.text)
        if token.kind == "string":
            self.i += 1
            return self.ev._join(token.parts, self.scope) if token.parts else ""
        if self.take("("):
            value = self.ternary()
            self.expect(")")
            return value
        if self.at("["):
            return self.tuple_or_for()
        if self.at("{"):
            return self.object_or_for()
        if token.kind == "ident":
            self.i += 1
            return self.identifier(token.text)
        raise EvalError(f"unexpected {token.text or token.kind!r}")

    def identifier(self, name: str) -> Any:
        if name in ("true", "false"):
            return name == "true"
        if name == "null":
            return None
        if self.at("("):
            return self.call(name)
        if name in self.scope:
            return self.scope[name]
        if name in ("var", "local"):
            self.expect(".")
            attr = self.tok.text
            self.i += 1
            return self.ev.variable(attr) if name == "var" else self.ev.local(attr)
        if name in ("data", "module", "path", "terraform", "self"):
            return UNKNOWN
        if "_" in name and self.at("."):
            self.i += 1
            resource_name = self.tok.text
            self.i += 1
            return self.ev.resource(f"{name}.{resource_name}")
        raise EvalError(f"unknown name {name!r}")

    def call(self, name: str) -> Any:
        self.expect("(")
        args = []
        while not self.at(")"):
            args.append(self.ternary())
            if self.take("..."):
                args = [*args[:-1], *(args[-1] if args[-1] is not UNKNOWN else [UNKNOWN])]
            if not self.take(","):
                break
        self.expect(")")
        fn = FUNCTIONS.get(name)
        if fn is None:
            return UNKNOWN  # can(), try(), file(), filemd5(), ...: not evaluated offline
        return fn(*args)

    def _skip_to(self, closer: str) -> None:
        depth = 0
        while self.tok.kind != "end":
            if self.tok.kind == "op" and self.tok.text in "([{":
                depth += 1
            elif self.tok.kind == "op" and self.tok.text in ")]}":
                if depth == 0 and self.tok.text == closer:
                    return
                depth -= 1
            self.i += 1

    def _for_header(self) -> tuple[list[str], Any]:
        names = [self.tok.text]
        self.i += 1
        if self.take(","):
            names.append(self.tok.text)
            self.i += 1
        self.expect("in")
        collection = self.ternary()
        self.expect(":")
        return names, collection

    def _for_items(self, names: list[str], collection: Any) -> Iterator[dict[str, Any]]:
        if isinstance(collection, ResourceRef):  # every instance of a for_each/count resource
            collection = {
                key: ResourceRef(collection.block, key, True) for key, _ in self.ev.instances(collection.block)
            }
        items = collection.items() if isinstance(collection, dict) else enumerate(collection)
        for key, value in items:
            yield {**self.scope, **({names[0]: value} if len(names) == 1 else {names[0]: key, names[1]: value})}

    def _sub(self, scope: dict[str, Any], start: int, stop: str | tuple[str, ...]) -> tuple[Any, int]:
        """Evaluate one expression starting at token `start` in `scope`; returns (value, index after)."""
        sub = _Parser(self.tokens, self.ev, scope)
        sub.i = start
        value = sub.ternary()
        stops = (stop,) if isinstance(stop, str) else stop
        if not any(sub.at(s) for s in stops):
            raise EvalError(f"expected one of {stops} in a for expression")
        return value, sub.i

    def tuple_or_for(self) -> Any:
        self.expect("[")
        if self.take("for"):
            names, collection = self._for_header()
            start = self.i
            result: Any = []
            if collection is UNKNOWN:
                result = UNKNOWN
            for scope in [] if collection is UNKNOWN else self._for_items(names, collection):
                value, after = self._sub(scope, start, ("if", "]"))
                keep = True
                if self.tokens[after].text == "if":
                    keep, _ = self._sub(scope, after + 1, "]")
                if keep is UNKNOWN:
                    result = UNKNOWN
                    break
                if keep:
                    result.append(value)
            self._skip_to("]")
            self.expect("]")
            return result
        items = []
        while not self.at("]"):
            items.append(self.ternary())
            if not self.take(","):
                break
        self.expect("]")
        return items

    def object_or_for(self) -> Any:
        self.expect("{")
        if self.take("for"):
            names, collection = self._for_header()
            start = self.i
            result: Any = {}
            for scope in [] if collection is UNKNOWN else self._for_items(names, collection):
                key, after = self._sub(scope, start, "=>")
                value, after = self._sub(scope, after + 1, ("if", "}", "..."))
                keep = True
                if self.tokens[after].text == "if":
                    keep, _ = self._sub(scope, after + 1, "}")
                if key is UNKNOWN or keep is UNKNOWN:
                    result = UNKNOWN
                    break
                if keep:
                    result[key] = value
            if collection is UNKNOWN:
                result = UNKNOWN
            self._skip_to("}")
            self.expect("}")
            return result
        obj: dict[str, Any] = {}
        while not self.at("}"):
            if self.tok.kind == "ident" and self.tokens[self.i + 1].text in ("=", ":"):
                key: Any = self.tok.text
                self.i += 1
            else:
                key = self.ternary()
            if not (self.take("=") or self.take(":")):
                raise EvalError("expected = or : in an object")
            obj[key] = self.ternary()
            self.take(",")
        self.expect("}")
        return obj


def _apply(op: str, left: Any, right: Any) -> Any:
    if op in ("&&", "||"):
        if left is UNKNOWN or right is UNKNOWN:
            return UNKNOWN
        return (left and right) if op == "&&" else (left or right)
    if not _known(left, right):
        return UNKNOWN
    if op == "==":
        return left == right
    if op == "!=":
        return left != right
    a, b = _number(left), _number(right)
    result: Any = {
        "<": lambda: a < b,
        ">": lambda: a > b,
        "<=": lambda: a <= b,
        ">=": lambda: a >= b,
        "+": lambda: a + b,
        "-": lambda: a - b,
        "*": lambda: a * b,
        "/": lambda: a / b,
        "%": lambda: a % b,
    }[op]()
    if isinstance(result, float) and result.is_integer() and op != "/":
        return int(result)
    return result
