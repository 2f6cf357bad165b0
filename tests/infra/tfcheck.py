"""Offline checks of the Terraform in infra/, without `terraform init` (no provider downloads here).

- parse every `.tf` file with python-hcl2 8.x (nested blocks carry `__is_block__`, labels and string
  values keep their quotes, expressions come back as `"${...}"` strings);
- check resources and data sources against the providers' real schemas (tests/infra/data/, see its
  README: the part of the Google provider's schema that infra/ uses, plus hand-described resources of
  other providers): types, arguments, nested blocks, required arguments/blocks, read-only attributes,
  block counts, and that every provider whose resources are used is declared in required_providers;
- find every `var.`/`local.`/`data.`/`module.`/`<resource type>.` reference and check it is declared;
- small helpers the tests use to read variables, locals and resources.

Used by tests/infra/test_terraform.py; kept free of pytest so it can be run by hand:
`python -m tests.infra.tfcheck infra/`.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hcl2

REPO_ROOT = Path(__file__).resolve().parents[2]
INFRA_DIR = REPO_ROOT / "infra"
SCHEMA_ENV = "DICOMFLOW_PROVIDER_SCHEMA"
DATA_DIR = Path(__file__).resolve().parent / "data"
# Vendored: the repository needs no file from outside itself (tests/infra/data/README.md).
VENDORED_SCHEMA = DATA_DIR / "google_provider_schema.json"
OTHER_PROVIDERS_SCHEMA = DATA_DIR / "other_providers_schema.json"

# Terraform language, not provider schema (tests/infra/data/README.md).
META_ARGUMENTS = frozenset({"count", "for_each", "depends_on", "provider", "lifecycle", "provisioner", "connection"})
DYNAMIC_KEYS = frozenset({"for_each", "iterator", "labels", "content"})
# Prefixes that are never references to declared things.
IGNORED_ROOTS = frozenset({"each", "count", "self", "path", "terraform"})


def schema_path() -> Path:
    """The Google provider schema: the vendored subset, or a full schema named by $DICOMFLOW_PROVIDER_SCHEMA."""
    override = os.environ.get(SCHEMA_ENV)
    return Path(override) if override else VENDORED_SCHEMA


# --- parsing ------------------------------------------------------------------------------------------------


def unquote(text: str) -> str:
    """Labels and string values keep their quotes in python-hcl2 8.x."""
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        return text[1:-1]
    return text


def is_block_list(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(item, dict) and item.get("__is_block__") is True for item in value)
    )


def body_items(body: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """Attributes and blocks of a body, without python-hcl2's bookkeeping keys."""
    for key, value in body.items():
        if not key.startswith("__"):
            yield key, value


@dataclass(frozen=True)
class Block:
    kind: str  # "resource" or "data"
    type: str
    name: str
    body: dict[str, Any]
    file: Path

    @property
    def address(self) -> str:
        prefix = "data." if self.kind == "data" else ""
        return f"{prefix}{self.type}.{self.name}"


@dataclass
class TfModule:
    directory: Path
    files: dict[Path, dict[str, Any]]
    texts: dict[Path, str]

    @classmethod
    def load(cls, directory: Path) -> TfModule:
        files: dict[Path, dict[str, Any]] = {}
        texts: dict[Path, str] = {}
        for path in sorted(directory.glob("*.tf")):
            text = path.read_text(encoding="utf-8")
            texts[path] = text
            files[path] = hcl2.loads(text)
        return cls(directory, files, texts)

    @classmethod
    def from_texts(cls, directory: Path, texts: dict[str, str]) -> TfModule:
        """A module from in-memory file contents (used to prove that checks fail on bad input)."""
        paths = {directory / name: text for name, text in texts.items()}
        return cls(directory, {p: hcl2.loads(t) for p, t in paths.items()}, paths)

    def _top(self, key: str) -> Iterator[tuple[Path, dict[str, Any]]]:
        for path, parsed in self.files.items():
            for entry in parsed.get(key, []):
                yield path, entry

    def blocks(self, kind: str) -> list[Block]:
        found = []
        for path, entry in self._top(kind):
            for type_label, named in body_items(entry):
                for name_label, body in body_items(named):
                    found.append(Block(kind, unquote(type_label), unquote(name_label), body, path))
        return found

    def resources(self, type_: str | None = None) -> list[Block]:
        return [b for b in self.blocks("resource") if type_ is None or b.type == type_]

    def resource(self, type_: str, name: str) -> Block:
        for block in self.resources(type_):
            if block.name == name:
                return block
        raise KeyError(f"{type_}.{name} is not declared in {self.directory}")

    def data_sources(self) -> list[Block]:
        return self.blocks("data")

    def _labelled(self, key: str) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for _, entry in self._top(key):
            for label, body in body_items(entry):
                found[unquote(label)] = body
        return found

    def variables(self) -> dict[str, dict[str, Any]]:
        return self._labelled("variable")

    def outputs(self) -> dict[str, dict[str, Any]]:
        return self._labelled("output")

    def modules(self) -> dict[str, dict[str, Any]]:
        return self._labelled("module")

    def providers(self) -> list[tuple[str, dict[str, Any]]]:
        return [(unquote(label), body) for _, entry in self._top("provider") for label, body in body_items(entry)]

    def locals(self) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for _, entry in self._top("locals"):
            for name, value in body_items(entry):
                found[name] = value
        return found

    def text_without_comments(self) -> str:
        return "\n".join(strip_comments(text) for text in self.texts.values())


def strip_comments(text: str) -> str:
    """Drop `#` and `//` line comments and `/* */` comments outside string literals (heredocs are kept)."""
    out: list[str] = []
    i, n = 0, len(text)
    in_string = False
    while i < n:
        ch = text[i]
        if in_string:
            out.append(ch)
            if ch == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 2
                continue
            if ch == '"':
                in_string = False
            i += 1
            continue
        if ch == '"':
            in_string = True
            out.append(ch)
            i += 1
        elif ch == "#" or text.startswith("//", i):
            while i < n and text[i] != "\n":
                i += 1
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            i = n if end < 0 else end + 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


# --- provider schema ----------------------------------------------------------------------------------------


class ProviderSchema:
    def __init__(self, data: dict[str, Any], others: dict[str, Any] | None = None) -> None:
        self.data = data
        self.version = str(data.get("provider_version", "?"))
        self.resources: dict[str, Any] = dict(data["resources"])
        self.data_sources: dict[str, Any] = dict(data["data_sources"])
        self.provider_config: dict[str, Any] = data.get("provider_config", {})
        # Types of other providers: listed by name only (allowed, not checked) or described in full
        # (checked like the Google provider's). Provider local name (e.g. "time") -> source address.
        self.other_resources: set[str] = set()
        self.other_data_sources: set[str] = set()
        self.provider_sources: dict[str, str] = {"google": "hashicorp/google"}
        for source, other in {**(data.get("other_providers") or {}), **(others or {})}.items():
            local_name = other.get("local_name") or source.rsplit("/", 1)[-1]
            self.provider_sources[local_name] = source.removeprefix("registry.terraform.io/")
            for kind, names, table in (
                ("resources", self.other_resources, self.resources),
                ("data_sources", self.other_data_sources, self.data_sources),
            ):
                declared = other.get(kind) or []
                names.update(declared)
                if isinstance(declared, dict):
                    table.update(declared)

    @classmethod
    def load(cls, path: Path | None = None, others: Path | None = OTHER_PROVIDERS_SCHEMA) -> ProviderSchema:
        with (path or schema_path()).open(encoding="utf-8") as fh:
            data = json.load(fh)
        extra: dict[str, Any] = {}
        if others is not None and others.is_file():
            with others.open(encoding="utf-8") as fh:
                extra = json.load(fh)["providers"]
        return cls(data, extra)

    def node(self, kind: str, type_: str) -> dict[str, Any] | None:
        table = self.resources if kind == "resource" else self.data_sources
        return table.get(type_)

    def is_known(self, kind: str, type_: str) -> bool:
        others = self.other_resources if kind == "resource" else self.other_data_sources
        return self.node(kind, type_) is not None or type_ in others


def _check_object_attribute(value: Any, spec: Any, where: str) -> list[str]:
    """`x = [{...}]` attributes; the schema lists their keys (a list of names or a nested mapping)."""
    items = value if isinstance(value, list) else [value]
    errors = []
    for item in items:
        if isinstance(item, str):  # an expression: cannot be checked statically
            continue
        if not isinstance(item, dict) or item.get("__is_block__"):
            errors.append(f"{where}: must be written `{where.rsplit('.', 1)[-1]} = [{{...}}]` (an attribute)")
            continue
        allowed = spec if isinstance(spec, dict) else dict.fromkeys(spec or [])
        if not allowed:
            continue
        for key, sub in body_items(item):
            if key not in allowed:
                errors.append(f"{where}.{key}: unknown key (allowed: {', '.join(sorted(allowed))})")
            elif isinstance(allowed[key], (dict, list)) and allowed[key]:
                errors.extend(_check_object_attribute(sub, allowed[key], f"{where}.{key}"))
    return errors


def _check_dynamic(value: Any, blocks: dict[str, Any], where: str, used: set[str]) -> list[str]:
    """`dynamic "x" { for_each = ... content { ... } }`: x must be a nested block; content is checked as x."""
    errors: list[str] = []
    for entry in value if isinstance(value, list) else [value]:
        for label, dyn in body_items(entry):
            name = unquote(label)
            dyn_where = f"{where}.dynamic[{name}]"
            if name not in blocks:
                errors.append(f"{dyn_where}: `{name}` is not a nested block of this schema")
                continue
            used.add(name)
            errors.extend(
                f"{dyn_where}.{key}: not allowed in a dynamic block"
                for key, _ in body_items(dyn)
                if key not in DYNAMIC_KEYS
            )
            if "for_each" not in dyn:
                errors.append(f"{dyn_where}: dynamic block without for_each")
            contents = dyn.get("content")
            if not is_block_list(contents):
                errors.append(f"{dyn_where}: dynamic block without a content block")
                continue
            for content in contents:
                errors.extend(check_body(content, blocks[name], f"{where}.{name}"))
    return errors


def _check_attribute(key: str, value: Any, node: dict[str, Any], here: str, *, top: bool) -> list[str]:
    """One `key = value` (or a block written where an attribute belongs)."""
    if top and key == "id" and key not in set(node.get("required") or []):
        # Listed as optional on many resources (the SDK adds it), but it is the provider's to set.
        return [f"{here}: `id` is set by the provider; never set it"]
    if key in set(node.get("arguments") or []):
        return [f"{here}: is an argument; write `{key} = ...`, not a block"] if is_block_list(value) else []
    if key in set(node.get("computed") or []):
        return [f"{here}: is read-only (computed); it cannot be set"]
    return [f"{here}: unknown argument or block"]


def _check_counts(
    body: dict[str, Any], node: dict[str, Any], where: str, counts: Counter[str], dynamic: set[str]
) -> list[str]:
    errors = [
        f"{where}: required argument `{name}` is missing"
        for name in sorted(node.get("required") or [])
        if name not in body
    ]
    errors.extend(
        f"{where}: set at least one of {', '.join(group)}"
        for group in node.get("at_least_one_of") or []
        if not any(name in body for name in group)
    )
    for name, block in sorted((node.get("blocks") or {}).items()):
        if block.get("min_items_ge_1") and counts[name] == 0 and name not in dynamic:
            errors.append(f"{where}: required block `{name}` is missing")
        max_items = block.get("max_items")
        if max_items and counts[name] > max_items:
            errors.append(f"{where}: block `{name}` appears {counts[name]} times (at most {max_items})")
    return errors


def check_body(body: dict[str, Any], node: dict[str, Any], where: str, *, top: bool = False) -> list[str]:
    """Errors of one resource/data/provider body (or nested block) against its schema node."""
    errors: list[str] = []
    blocks: dict[str, Any] = node.get("blocks") or {}
    object_attributes: dict[str, Any] = node.get("object_attributes") or {}
    counts: Counter[str] = Counter()
    dynamic: set[str] = set()
    for key, value in body_items(body):
        here = f"{where}.{key}"
        if top and key in META_ARGUMENTS:
            continue
        if key == "dynamic":
            errors.extend(_check_dynamic(value, blocks, where, dynamic))
        elif key in blocks:
            if not is_block_list(value):
                errors.append(f"{here}: is a nested block; write `{key} {{ ... }}`, not `{key} = ...`")
                continue
            counts[key] += len(value)
            for item in value:
                errors.extend(check_body(item, blocks[key], here))
        elif key in object_attributes:
            errors.extend(_check_object_attribute(value, object_attributes[key], here))
        else:
            errors.extend(_check_attribute(key, value, node, here, top=top))
    return errors + _check_counts(body, node, where, counts, dynamic)


def schema_errors(module: TfModule, schema: ProviderSchema) -> list[str]:
    errors: list[str] = []
    for kind in ("resource", "data"):
        for block in module.blocks(kind):
            where = f"{block.file.name}: {block.address}"
            if not schema.is_known(kind, block.type):
                errors.append(f"{where}: unknown {kind} type `{block.type}` in provider {schema.version}")
                continue
            node = schema.node(kind, block.type)
            if node is not None:
                errors.extend(check_body(block.body, node, where, top=True))
    for name, body in module.providers():
        if name == "google" and schema.provider_config:
            errors.extend(check_body(body, schema.provider_config, f"provider.{name}", top=True))
    return errors + provider_declaration_errors(module, schema)


def required_providers(module: TfModule) -> dict[str, str]:
    """`terraform { required_providers { name = { source = ... } } }`: local name -> source."""
    found: dict[str, str] = {}
    for parsed in module.files.values():
        for terraform in parsed.get("terraform", []):
            for entry in terraform.get("required_providers", []):
                for name, spec in body_items(entry):
                    if isinstance(spec, dict):
                        found[name] = unquote(str(spec.get("source", "")))
    return found


def provider_declaration_errors(module: TfModule, schema: ProviderSchema) -> list[str]:
    """Every provider whose resources are used is pinned in required_providers with its real source:
    without it `terraform init` would fetch an unpinned provider (or none, for a non-hashicorp one)."""
    declared = required_providers(module)
    errors = []
    for local_name in sorted({b.type.split("_", 1)[0] for b in module.blocks("resource") + module.blocks("data")}):
        expected = schema.provider_sources.get(local_name)
        if local_name not in declared:
            errors.append(f"versions.tf: provider `{local_name}` is used but not in required_providers")
        elif expected and declared[local_name] != expected:
            errors.append(f"versions.tf: provider `{local_name}` has source {declared[local_name]!r}, not {expected!r}")
    return errors


# --- expressions and references -----------------------------------------------------------------------------

_PLAIN_STRING = re.compile(r'"(?:[^"\\$]|\\.|\$(?!\{))*"')
_REFERENCE = re.compile(
    r"(?<![\w.\-])(?:"
    r"(?P<kind>var|local|module)\.(?P<name>[A-Za-z_][\w-]*)"
    r"|data\.(?P<dtype>[A-Za-z_]\w*)\.(?P<dname>[A-Za-z_][\w-]*)"
    r"|(?P<rtype>[a-z][a-z0-9]*_[a-z0-9_]+)\.(?P<rname>[A-Za-z_][\w-]*)"
    r")"
)


def interpolations(template: str) -> list[str]:
    """The `${...}` expressions of a template string (`$${` is an escaped literal), nested braces included."""
    found: list[str] = []
    i = 0
    while True:
        start = template.find("${", i)
        if start < 0:
            return found
        if start > 0 and template[start - 1] == "$":
            i = start + 2
            continue
        depth, j = 0, start + 1
        in_string = False
        while j < len(template):
            ch = template[j]
            if in_string:
                if ch == "\\":
                    j += 1
                elif ch == '"':
                    in_string = False
            elif ch == '"':
                in_string = True
            elif ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        found.append(template[start + 2 : j])
        i = j + 1


def expressions(value: Any) -> Iterator[str]:
    """Every expression text in a parsed value (interpolations of strings, recursively)."""
    if isinstance(value, str):
        yield from interpolations(value)
    elif isinstance(value, dict):
        for key, sub in value.items():
            if key == "__comments__":
                continue
            if isinstance(key, str) and "${" in key:  # a computed object key
                yield from expressions(key)
            yield from expressions(sub)
    elif isinstance(value, list):
        for item in value:
            yield from expressions(item)


def references(expr: str) -> Iterator[tuple[str, str]]:
    """(kind, target) pairs: ("var", "x"), ("local", "x"), ("module", "x"), ("data", "t.n"), ("resource", "t.n")."""
    # Nested templates ("a-${var.x}") keep their interpolations; plain literals are dropped so that words in
    # descriptions or filters are not mistaken for references.
    text = _PLAIN_STRING.sub('""', expr)
    for match in _REFERENCE.finditer(text):
        if match.group("kind"):
            yield match.group("kind"), match.group("name")
        elif match.group("dtype"):
            yield "data", f"{match.group('dtype')}.{match.group('dname')}"
        else:
            yield "resource", f"{match.group('rtype')}.{match.group('rname')}"


def reference_errors(module: TfModule, schema: ProviderSchema) -> list[str]:
    variables = set(module.variables())
    locals_ = set(module.locals())
    modules = set(module.modules())
    resources = {b.address for b in module.resources()}
    data = {b.address for b in module.data_sources()}
    resource_types = set(schema.resources) | schema.other_resources | {b.type for b in module.resources()}
    errors: list[str] = []
    for path, parsed in module.files.items():
        for expr in expressions(parsed):
            for kind, target in references(expr):
                root = target.split(".", 1)[0]
                if root in IGNORED_ROOTS:
                    continue
                missing = (
                    (kind == "var" and target not in variables)
                    or (kind == "local" and target not in locals_)
                    or (kind == "module" and target not in modules)
                    or (kind == "data" and f"data.{target}" not in data)
                )
                if kind == "resource":
                    type_ = target.split(".", 1)[0]
                    if type_ in resource_types:
                        missing = target not in resources
                    elif type_.split("_", 1)[0] in schema.provider_sources:
                        errors.append(f"{path.name}: `{target}` names an unknown resource type")
                        continue
                if missing:
                    errors.append(f"{path.name}: reference to undeclared {kind} `{target}` in `{expr.strip()[:120]}`")
    return sorted(set(errors))


def local_dependencies(module: TfModule, start: str) -> set[str]:
    """Names of the locals an expression string reaches, transitively (start itself included if a local)."""
    locals_ = module.locals()
    seen: set[str] = set()
    todo = [start]
    while todo:
        expr = todo.pop()
        for kind, target in references(expr):
            if kind == "local" and target not in seen and target in locals_:
                seen.add(target)
                todo.extend(expressions(locals_[target]))
    return seen


# --- values -------------------------------------------------------------------------------------------------

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)s$")


def literal(value: Any) -> Any:
    """A literal number/string/bool of python-hcl2 output, or the raw expression string."""
    if isinstance(value, str):
        if value.startswith('"') and "${" not in value:
            return unquote(value)
        if value.startswith("${") and value.endswith("}"):
            inner = value[2:-1].strip()
            if re.fullmatch(r"-?\d+(?:\.\d+)?", inner):
                return float(inner) if "." in inner else int(inner)
            if inner in ("true", "false"):
                return inner == "true"
    return value


def seconds(value: Any) -> float | None:
    """A Cloud Tasks duration literal ("10s") in seconds, or None when it is not a literal."""
    text = literal(value)
    if isinstance(text, (int, float)):
        return float(text)
    if isinstance(text, str):
        match = _DURATION.match(text)
        if match:
            return float(match.group(1))
    return None


def single_block(body: dict[str, Any], name: str) -> dict[str, Any]:
    blocks = body.get(name)
    if not is_block_list(blocks) or len(blocks) != 1:
        raise KeyError(f"expected exactly one `{name}` block")
    return blocks[0]


def main(argv: list[str]) -> int:
    directory = Path(argv[1]) if len(argv) > 1 else INFRA_DIR
    module = TfModule.load(directory)
    schema = ProviderSchema.load()
    errors = schema_errors(module, schema) + reference_errors(module, schema)
    for error in errors:
        print(error)
    print(f"{len(errors)} error(s) in {len(module.files)} file(s) against google provider {schema.version}")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
