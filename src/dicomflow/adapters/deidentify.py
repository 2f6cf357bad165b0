"""The de-identification profile (docs/privacy.md) applied to dcm2niix's outputs, locally and in the cloud.

dcm2niix writes uncompressed NIfTI (`-z n`, services/convert_series.py) so that the header's text fields
can be scrubbed in place for microseconds; the profile then compresses with a deterministic writer (no
timestamp, no name in the gzip header). Sidecars go through the allow-list; free text in them loses the
series' identifiers, token by token. The identifiers come from the series' own headers, read here with
pydicom and never stored.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from dicomflow.adapters.dicom_identifiers import read_identifiers, read_study_time
from dicomflow.adapters.nifti_text import gzip_nifti, scrub_nifti
from dicomflow.domain.facts import offset_from_study
from dicomflow.domain.privacy import Identifiers, filter_sidecar

PROFILE_VERSION = "privacy1"


class ProfileDeidentifier:
    def __init__(self, extra_keys: frozenset[str] = frozenset(), *, gzip_level: int = 6) -> None:
        self._extra = extra_keys
        self._level = gzip_level

    @property
    def version(self) -> str:
        return PROFILE_VERSION

    def identifiers(self, input_dir: Path) -> Identifiers:
        # The first and last file by name: identifiers are per study and patient, the same in every file of
        # a series; two reads catch an export that mixes (e.g. a renamed series).
        files = sorted(p for p in input_dir.iterdir() if p.is_file())
        return read_identifiers(files[:1] + files[-1:]) if files else Identifiers()

    def acquisition_offset(self, input_dir: Path, outputs: Sequence[Path]) -> float | None:
        files = sorted(p for p in input_dir.iterdir() if p.is_file())
        study_time = read_study_time(files[0]) if files else None
        times: list[object] = []
        for path in outputs:
            if path.name.endswith(".json"):
                try:
                    times.append(json.loads(path.read_text(encoding="utf-8")).get("AcquisitionTime"))
                except (OSError, ValueError, AttributeError):
                    continue
        return offset_from_study(times, study_time)

    def apply(self, outputs: Sequence[Path], identifiers: Identifiers, *, compress: bool) -> tuple[Path, ...]:
        result: list[Path] = []
        for path in outputs:
            published = path
            if path.name.endswith(".json"):
                sidecar = json.loads(path.read_text(encoding="utf-8"))
                clean = filter_sidecar(sidecar, identifiers, self._extra)
                path.write_text(json.dumps(clean, indent="\t", ensure_ascii=False) + "\n", encoding="utf-8")
            elif path.name.endswith(".nii"):
                scrub_nifti(path)
                if compress:
                    published = gzip_nifti(path, level=self._level)
            elif path.name.endswith(".nii.gz"):
                scrub_nifti(path, level=self._level)
            result.append(published)
        return tuple(sorted(result))
