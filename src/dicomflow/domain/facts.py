"""What a conversion learns about its outputs, recorded with the series for the report and the BIDS plan.

The worker has the outputs on its disk; the batch's finish step (services/finish.py) may run elsewhere,
later, for series converted by other batches. So the worker records here what the finish step needs and
could otherwise only get by downloading every output again:
- per NIfTI output, what the QA report shows: shape, voxel size, volumes and a small thumbnail (PNG);
- for `--layout bids`, each output's JSON sidecar as published (after the privacy profile) — what rules
  match and what the BIDS sidecar is written from — and when the series was acquired, as seconds from the
  start of its study (a duration: never a date or a time of day, docs/privacy.md).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

# A series with many outputs (one per echo, coil or b-value) keeps thumbnails of its first ones only:
# a series record must stay far below Firestore's 1 MiB per document (GCP_FACTS gotcha 24).
MAX_THUMBNAILS: Final = 12


@dataclass(frozen=True, slots=True)
class OutputImage:
    """One NIfTI output as the report shows it. `file` is the name the converter gave it."""

    file: str
    shape: tuple[int, ...]
    voxel_size: tuple[float, ...]
    volumes: int
    thumbnail_png: bytes | None = None
    thumbnail_size: tuple[int, int] = (0, 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "shape": list(self.shape),
            "voxel_size": list(self.voxel_size),
            "volumes": self.volumes,
            "thumbnail": base64.b64encode(self.thumbnail_png).decode("ascii") if self.thumbnail_png else "",
            "thumbnail_size": list(self.thumbnail_size),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OutputImage:
        thumb = str(data.get("thumbnail") or "")
        size = data.get("thumbnail_size") or (0, 0)
        return cls(
            file=str(data["file"]),
            shape=tuple(int(n) for n in data.get("shape") or ()),
            voxel_size=tuple(float(z) for z in data.get("voxel_size") or ()),
            volumes=int(data.get("volumes", 1)),
            thumbnail_png=base64.b64decode(thumb) if thumb else None,
            thumbnail_size=(int(size[0]), int(size[1])),
        )


@dataclass(frozen=True, slots=True)
class SeriesFacts:
    """`images` by output; `sidecars` by output stem (BIDS only); `acquired_at` in seconds from the start
    of the series' study (BIDS only; None when unknown); `extras`: by output stem, the sidecar keys a rule
    added when the output was placed in a BIDS dataset (written again with it)."""

    images: tuple[OutputImage, ...] = ()
    sidecars: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    acquired_at: float | None = None
    extras: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"images": [i.to_dict() for i in self.images]}
        if self.sidecars:
            data["sidecars"] = {k: dict(v) for k, v in self.sidecars.items()}
        if self.acquired_at is not None:
            data["acquired_at"] = self.acquired_at
        if self.extras:
            data["extras"] = {k: dict(v) for k, v in self.extras.items()}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> SeriesFacts:
        if not data:
            return cls()
        when = data.get("acquired_at")
        return cls(
            images=tuple(OutputImage.from_dict(i) for i in data.get("images") or ()),
            sidecars={str(k): dict(v) for k, v in (data.get("sidecars") or {}).items()},
            acquired_at=None if when is None else float(when),
            extras={str(k): dict(v) for k, v in (data.get("extras") or {}).items()},
        )

    def image_of(self, file: str) -> OutputImage | None:
        return next((i for i in self.images if i.file == file), None)


HALF_DAY: Final = 43_200.0


def offset_from_study(acquisition_times: list[object], study_time: object) -> float | None:
    """Seconds from the study's start (its StudyTime) to the earliest of `acquisition_times` (times of day
    as DICOM or dcm2niix write them). An acquisition more than half a day "before" the study started is
    taken to be after midnight. None when a time is missing or unreadable."""
    from dicomflow.domain.bids import seconds_of_day  # noqa: PLC0415 - bids imports nothing from here

    start = seconds_of_day(study_time)
    times = [t for t in (seconds_of_day(a) for a in acquisition_times) if t is not None]
    if start is None or not times:
        return None
    offset = min(times) - start
    return round(offset + 86_400.0 if offset < -HALF_DAY else offset, 6)
