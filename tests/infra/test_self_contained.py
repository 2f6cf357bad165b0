"""The repository is self-contained: the infra checks read their provider schemas from tests/infra/data/,
no test names a path outside the repository, and the vendored subset can be regenerated from a full
schema by the documented command."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.infra import tfcheck, vendor_schema
from tests.infra.tfcheck import INFRA_DIR, REPO_ROOT, ProviderSchema, TfModule

pytestmark = pytest.mark.infra

# A path that climbs out of the repository: ../shared, parents[3] of a file two levels deep, /work/...
_OUTSIDE = re.compile(r"""(\.\./+shared|["'/]shared/terraform|parents\[[3-9]\]|["']/work/)""")


def test_the_schema_is_read_from_inside_the_repository(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(tfcheck.SCHEMA_ENV, raising=False)
    path = tfcheck.schema_path().resolve()
    assert path.is_relative_to(REPO_ROOT), path
    assert path.is_file()
    assert tfcheck.OTHER_PROVIDERS_SCHEMA.resolve().is_relative_to(REPO_ROOT)


def test_no_test_names_a_path_outside_the_repository() -> None:
    offenders = []
    for path in sorted((REPO_ROOT / "tests").rglob("*.py")):
        if path == Path(__file__):
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if _OUTSIDE.search(line):
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}")
    assert not offenders, "tests must not read files from outside the repository:\n" + "\n".join(offenders)


def test_the_vendored_subset_holds_every_type_infra_uses_and_nothing_else() -> None:
    module = TfModule.load(INFRA_DIR)
    resources, data_sources = vendor_schema.used_types(module)
    data = json.loads(tfcheck.VENDORED_SCHEMA.read_text(encoding="utf-8"))
    assert set(data["resources"]) == {t for t in resources if t.startswith("google_")}
    assert set(data["data_sources"]) == {t for t in data_sources if t.startswith("google_")}
    schema = ProviderSchema.load()
    assert all(schema.is_known("resource", t) for t in resources)


def test_the_generator_keeps_only_used_types(tmp_path: Path) -> None:
    full = {
        "provider_version": "9.9.9",
        "source": "synthetic",
        "provider_config": {"arguments": ["project"]},
        "resources": {"google_a": {"arguments": ["x"]}, "google_b": {"arguments": ["y"]}},
        "data_sources": {"google_c": {"arguments": []}, "google_d": {"arguments": []}},
    }
    out = vendor_schema.subset(full, {"google_a", "google_missing"}, {"google_d"})
    assert set(out["resources"]) == {"google_a"}
    assert set(out["data_sources"]) == {"google_d"}
    assert out["provider_version"] == "9.9.9"
    assert out["provider_config"] == {"arguments": ["project"]}
    (tmp_path / "subset.json").write_text(json.dumps(out), encoding="utf-8")
    loaded = ProviderSchema.load(tmp_path / "subset.json", others=None)
    assert loaded.is_known("resource", "google_a")
    assert not loaded.is_known("resource", "google_b")


def test_a_provider_used_but_not_pinned_is_reported() -> None:
    schema = ProviderSchema.load()
    bad = TfModule.from_texts(
        INFRA_DIR,
        {
            "versions.tf": 'terraform {\n  required_providers {\n    google = {\n      source  = "hashicorp/google"\n'
            '      version = "~> 7.0"\n    }\n  }\n}\n',
            "wait.tf": 'resource "time_sleep" "w" {\n  triggers = {}\n}\n',
        },
    )
    errors = "\n".join(tfcheck.schema_errors(bad, schema))
    assert "provider `time` is used but not in required_providers" in errors
    assert "time_sleep.w: set at least one of create_duration, destroy_duration" in errors
