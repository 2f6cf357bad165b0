"""The rules file of `--layout bids`: which series become which BIDS files, overriding dcm2niix's guess.

In the spirit of dcm2bids' configuration file: an ordered list of rules, each matching sidecar keys
(SeriesDescription, ProtocolName, ImageType, ... — anything dcm2niix writes) and giving the datatype,
suffix and entities of the matching outputs, or setting them aside. The first matching rule wins.

JSON or TOML (both read by the standard library, so no new dependency)::

    {"rules": [
      {"id": "rest", "match": {"SeriesDescription": {"glob": "*rest*"}, "ImageType": "M"},
       "datatype": "func", "suffix": "bold", "entities": {"task": "rest"},
       "sidecar": {"PhaseEncodingDirection": "j-"}},
      {"id": "scouts", "match": {"SeriesDescription": {"regex": "(?i)scout|localizer"}},
       "unclassified": "localizers are not analysed"}
    ]}

A criterion is a plain value (exact match), a list (the sidecar list must equal it), or an object with
exactly one of `exact`, `glob` (shell pattern, case-sensitive, whole value) or `regex` (Python regular
expression searched in the value). Against a list-valued key such as ImageType, a single value, glob or
regex matches when any element does. Every problem is reported with the rule and the field.
"""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from dicomflow.domain import bids_schema as schema
from dicomflow.domain.failures import InvalidInput

RulesFormat = Literal["json", "toml"]

_RULE_KEYS: Final = frozenset({"id", "match", "datatype", "suffix", "entities", "sidecar", "unclassified"})
_OPERATORS: Final = ("exact", "glob", "regex")
# dcm2niix sets these per output; a rule cannot choose them (run: BIDS run indices are assigned by
# acquisition order, see domain/bids.py).
_DERIVED_ENTITIES: Final = frozenset({"run"})


class BidsConfigError(InvalidInput):
    """A rules file, subject mapping or label that cannot be used; `field` names the offending field."""

    code = "invalid_bids_config"


Scalar = str | int | float | bool
# Builds the error for one field of the rule being parsed: (message, key inside the rule).
_Fail = Callable[[str, str], "BidsConfigError"]


@dataclass(frozen=True, slots=True)
class Criterion:
    key: str
    operator: Literal["exact", "glob", "regex"]
    value: Scalar | tuple[Scalar, ...]

    def matches(self, sidecar: Mapping[str, object]) -> bool:
        if self.key not in sidecar:
            return False
        actual = sidecar[self.key]
        if isinstance(self.value, tuple):
            return isinstance(actual, list | tuple) and tuple(actual) == self.value
        if isinstance(actual, list | tuple):
            return any(self._one(item) for item in actual)
        return self._one(actual)

    def _one(self, actual: object) -> bool:
        if self.operator == "exact":
            if isinstance(actual, bool) or isinstance(self.value, bool):  # bool is an int: True must not match 1
                return type(actual) is type(self.value) and actual == self.value
            return actual == self.value
        text = actual if isinstance(actual, str) else json.dumps(actual)
        if self.operator == "glob":
            return fnmatch.fnmatchcase(text, str(self.value))
        return re.search(str(self.value), text) is not None


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule. `unclassified` (a reason) sets the matching outputs aside instead of naming them."""

    id: str
    criteria: tuple[Criterion, ...]
    datatype: str = ""
    suffix: str = ""
    entities: tuple[tuple[str, str], ...] = ()
    sidecar: Mapping[str, object] = field(default_factory=dict)
    unclassified: str = ""

    def matches(self, sidecar: Mapping[str, object]) -> bool:
        return all(c.matches(sidecar) for c in self.criteria)


def first_match(rules: Sequence[Rule], sidecar: Mapping[str, object]) -> Rule | None:
    return next((rule for rule in rules if rule.matches(sidecar)), None)


def parse_rules(text: str, fmt: RulesFormat = "json") -> tuple[Rule, ...]:
    """Parse and validate a rules file; raise `BidsConfigError` naming the rule and field at fault."""
    try:
        data: object = json.loads(text) if fmt == "json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise BidsConfigError(f"the rules file is not valid {fmt.upper()}: {exc}", field="rules") from None
    return rules_from_data(data)


def rules_from_data(data: object) -> tuple[Rule, ...]:
    """Validate a parsed rules document (the object a JSON or TOML rules file holds, or the batch API's
    `layout.rules`); raise `BidsConfigError` naming the rule and field at fault."""
    if not isinstance(data, dict) or set(data) != {"rules"} or not isinstance(data["rules"], list):
        raise BidsConfigError(
            'the rules file must be an object with one key, "rules", holding a list of rules', field="rules"
        )
    rules = tuple(_rule(i, raw) for i, raw in enumerate(data["rules"]))
    seen: set[str] = set()
    for i, rule in enumerate(rules):
        if rule.id in seen:
            raise BidsConfigError(f"rule {i + 1}: the id {rule.id!r} is used twice", field=f"rules[{i}].id")
        seen.add(rule.id)
    return rules


def _rule(index: int, raw: object) -> Rule:
    where = f"rules[{index}]"
    if not isinstance(raw, dict):
        raise BidsConfigError(f"rule {index + 1} must be an object", field=where)
    rule_id = raw.get("id")
    if not isinstance(rule_id, str) or not rule_id.strip():
        raise BidsConfigError(f'rule {index + 1} needs an "id" (a name used in messages)', field=f"{where}.id")
    name = f"rule {rule_id!r} (rule {index + 1})"

    def fail(message: str, key: str) -> BidsConfigError:
        return BidsConfigError(f"{name}: {message}", field=f"{where}.{key}")

    unknown = sorted(set(raw) - _RULE_KEYS)
    if unknown:
        raise fail(f"unknown key {unknown[0]!r}; a rule has {', '.join(sorted(_RULE_KEYS))}", unknown[0])
    match = raw.get("match")
    if not isinstance(match, dict) or not match:
        raise fail('"match" must be an object with at least one sidecar key to match', "match")
    criteria = tuple(_criterion(str(key), value, fail) for key, value in match.items())
    unclassified = raw.get("unclassified", "")
    if unclassified:
        if not isinstance(unclassified, str):
            raise fail('"unclassified" must be the reason, as text', "unclassified")
        extra = sorted({"datatype", "suffix", "entities", "sidecar"} & set(raw))
        if extra:
            raise fail(f'"unclassified" cannot be combined with {extra[0]!r}', extra[0])
        return Rule(rule_id, criteria, unclassified=unclassified)
    datatype, suffix = raw.get("datatype"), raw.get("suffix")
    if not isinstance(datatype, str) or datatype not in schema.DATATYPES:
        raise fail(f"datatype must be one of {', '.join(schema.DATATYPES)}, not {datatype!r}", "datatype")
    file_rule = schema.file_rule(datatype, str(suffix))
    if not isinstance(suffix, str) or file_rule is None:
        raise fail(
            f"suffix {suffix!r} is not a BIDS suffix of {datatype}; "
            f"use one of {', '.join(schema.suffixes_of(datatype))}",
            "suffix",
        )
    entities = _entities(raw.get("entities", {}), file_rule, fail)
    sidecar = raw.get("sidecar", {})
    if not isinstance(sidecar, dict) or not all(isinstance(k, str) for k in sidecar):
        raise fail('"sidecar" must be an object of JSON keys to add to the sidecar', "sidecar")
    return Rule(rule_id, criteria, datatype, suffix, entities, dict(sidecar))


def _criterion(key: str, value: object, fail: _Fail) -> Criterion:
    where = f"match.{key}"
    if isinstance(value, dict):
        if len(value) != 1 or next(iter(value)) not in _OPERATORS:
            raise fail(f"a criterion object takes exactly one of {', '.join(_OPERATORS)}", where)
        operator, operand = next(iter(value.items()))
        if operator == "exact":
            return _criterion(key, operand, fail)
        if not isinstance(operand, str):
            raise fail(f"{operator} needs a text pattern", f"{where}.{operator}")
        if operator == "regex":
            try:
                re.compile(operand)
            except re.error as exc:
                raise fail(f"invalid regular expression {operand!r}: {exc}", f"{where}.regex") from None
        return Criterion(key, operator, operand)
    if isinstance(value, list):
        if not all(isinstance(v, str | int | float) for v in value):
            raise fail("a list criterion may hold only text and numbers", where)
        return Criterion(key, "exact", tuple(value))
    if isinstance(value, str | int | float):
        return Criterion(key, "exact", value)
    raise fail("a criterion is a value, a list, or an object with exact, glob or regex", where)


def _entities(raw: object, file_rule: schema.FileRule, fail: _Fail) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, dict):
        raise fail('"entities" must be an object such as {"task": "rest"}', "entities")
    values: dict[str, str] = {}
    for name, value in raw.items():
        where = f"entities.{name}"
        if name in _DERIVED_ENTITIES:
            raise fail("run is assigned by dicomflow in acquisition order and cannot be set by a rule", where)
        text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
        if not isinstance(text, str):
            raise fail(f"{name} must be text", where)
        problem = schema.entity_error(name, text)
        if problem:
            raise fail(problem, where)
        if name not in file_rule.allowed:
            allowed = ", ".join(n for n in schema.ENTITY_ORDER if n in file_rule.allowed)
            raise fail(f"BIDS does not allow {name} in a {file_rule.datatype} file; allowed: {allowed}", where)
        values[name] = text
    return schema.ordered(values)
