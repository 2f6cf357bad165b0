"""The `--layout` options of `dicomflow convert`, `submit` and `watch add` (docs/bids.md).

Everything the user gives is read and validated here, before anything is submitted: labels, the subjects
mapping (CSV, errors name the line), the rules file (JSON or TOML, errors name the rule and the field).
The result is the `Layout` a local run records, and the `layout` object the batch API takes (which
carries the mapped folder names: the server keeps only their digests).
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from dicomflow.domain.bids_labels import parse_subjects_csv
from dicomflow.domain.bids_rules import BidsConfigError, RulesFormat, parse_rules
from dicomflow.domain.layout import FIELDMAP_STYLES, KINDS, Layout

F = TypeVar("F", bound=Callable[..., Any])

_FLAGS = {"subject": "--subject", "session": "--session", "subjects": "--subjects", "fieldmaps": "--fieldmaps"}


def layout_options(command: F) -> F:
    """The six options, in the order `--help` shows them."""
    options = [
        click.option("--layout", "layout_kind", type=click.Choice(KINDS), default="mirror", show_default=True,
                     help="mirror: outputs mirror SOURCE's folders. bids: a BIDS dataset with a QA report "
                     "(docs/bids.md)."),
        click.option("--subject", metavar="LABEL",
                     help="--layout bids: the subject of a source that holds one subject (folders named "
                     "sub-<label> still win)."),
        click.option("--session", metavar="LABEL",
                     help="--layout bids, with --subject: the session (folders named ses-<label> still win)."),
        click.option("--subjects", "subjects_file", metavar="FILE",
                     help="--layout bids: CSV of `source folder,subject[,session]`, one row per folder, for "
                     "sources not named sub-<label>."),
        click.option("--rules", "rules_file", metavar="FILE",
                     help="--layout bids: rules file (JSON, or TOML with a .toml name) naming series by "
                     "SeriesDescription, ProtocolName, ImageType...; overrides dcm2niix's guess."),
        click.option("--fieldmaps", type=click.Choice(FIELDMAP_STYLES), default="intended_for", show_default=True,
                     help="--layout bids: link fieldmaps to the runs they correct with IntendedFor, "
                     "B0FieldIdentifier/B0FieldSource, or both."),
    ]  # fmt: skip
    for option in reversed(options):
        command = option(command)
    return command


def _fail(message: str) -> NoReturn:
    from dicomflow.cli import fail  # noqa: PLC0415 - the CLI's one way to stop with exit code 1

    fail(message)


def _read(path: str, flag: str) -> str:
    try:
        return Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"{flag} {path}: cannot read it ({getattr(exc, 'strerror', None) or exc})")


def build_layout(
    *,
    layout_kind: str,
    subject: str | None,
    session: str | None,
    subjects_file: str | None,
    rules_file: str | None,
    fieldmaps: str,
) -> tuple[Layout, dict[str, Any] | None]:
    """The validated layout, and the batch API's `layout` object (None for the default mirror layout)."""
    if layout_kind != "bids":
        given = [f for f, v in (("--subject", subject), ("--session", session), ("--subjects", subjects_file),
                                ("--rules", rules_file)) if v]  # fmt: skip
        if fieldmaps != "intended_for":
            given.append("--fieldmaps")
        if given:
            _fail(f"{', '.join(given)}: only with --layout bids")
        return Layout(), None
    mapping = None
    rows: list[dict[str, Any]] | None = None
    if subjects_file:
        try:
            mapping = parse_subjects_csv(_read(subjects_file, "--subjects"))
        except BidsConfigError as exc:
            _fail(f"--subjects {subjects_file}: {exc.reason}")
        rows = [{"folder": f, "subject": labels.subject, "session": labels.session} for f, labels in mapping.items()]
    rules: Any = None
    if rules_file:
        text = _read(rules_file, "--rules")
        fmt: RulesFormat = "toml" if rules_file.lower().endswith(".toml") else "json"
        try:
            parse_rules(text, fmt)
        except BidsConfigError as exc:
            _fail(f"--rules {rules_file}: {exc.reason} (field {exc.field})")
        rules = json.loads(text) if fmt == "json" else tomllib.loads(text)
    try:
        layout = Layout.bids(subject=subject, session=session, subjects=mapping, rules=rules, fieldmaps=fieldmaps)
    except BidsConfigError as exc:
        _fail(f"{_FLAGS.get(exc.field, '--layout bids')}: {exc.reason}")
    body: dict[str, Any] = {"kind": "bids", "fieldmaps": fieldmaps}
    if subject is not None:
        body["subject"] = subject
    if session is not None:
        body["session"] = session
    if rows is not None:
        body["subjects"] = rows
    if rules is not None:
        body["rules"] = rules["rules"]
    return layout, body
