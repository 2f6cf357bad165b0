"""Regenerate tests/infra/data/google_provider_schema.json: the part of the Google provider's schema that
infra/ uses, so the offline checks need no file from outside the repository.

    python -m tests.infra.vendor_schema /path/to/google_provider_schema.json

The input is a full schema in the format described in tests/infra/data/README.md (one was derived from
hashicorp/terraform-provider-google's source for 7.45.0). The output keeps the provider's metadata, its
provider configuration, and only the resource and data-source types that some `.tf` file of infra/
declares. Run it again whenever infra/ starts using a new resource type (the schema test names the
missing type) or when moving to a new provider version.

Other providers (hashicorp/time) are not in the Google schema; their few resources are described by hand
in tests/infra/data/other_providers_schema.json, with the source each one was read from.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tests.infra.tfcheck import INFRA_DIR, VENDORED_SCHEMA, TfModule

METADATA_KEYS = ("provider_version", "provider_source_address", "source", "validation", "format")


def used_types(module: TfModule) -> tuple[set[str], set[str]]:
    """Resource and data-source types declared anywhere in the module."""
    return {b.type for b in module.resources()}, {b.type for b in module.data_sources()}


def subset(full: dict[str, Any], resources: set[str], data_sources: set[str]) -> dict[str, Any]:
    """The schema restricted to the given types (types the provider lacks are left out: the schema test
    reports them as unknown, which is the point)."""
    out: dict[str, Any] = {key: full[key] for key in METADATA_KEYS if key in full}
    out["provider_config"] = full.get("provider_config", {})
    out["resources"] = {name: full["resources"][name] for name in sorted(resources) if name in full["resources"]}
    out["data_sources"] = {
        name: full["data_sources"][name] for name in sorted(data_sources) if name in full["data_sources"]
    }
    out["vendored"] = (
        "subset of the full schema: only the types infra/ uses; regenerate with "
        "`python -m tests.infra.vendor_schema FULL_SCHEMA.json` (tests/infra/data/README.md)"
    )
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write(__doc__ or "")
        return 2
    full = json.loads(Path(argv[1]).read_text(encoding="utf-8"))
    resources, data_sources = used_types(TfModule.load(INFRA_DIR))
    google = {t for t in resources if t.startswith("google_")}
    vendored = subset(full, google, {t for t in data_sources if t.startswith("google_")})
    VENDORED_SCHEMA.write_text(json.dumps(vendored, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    missing = sorted(google - set(vendored["resources"]))
    sys.stdout.write(
        f"wrote {VENDORED_SCHEMA.relative_to(INFRA_DIR.parent)}: {len(vendored['resources'])} resource and "
        f"{len(vendored['data_sources'])} data-source types of provider {vendored.get('provider_version')}\n"
    )
    if missing:
        sys.stdout.write(f"not in this provider version: {', '.join(missing)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
