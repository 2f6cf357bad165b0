"""Where a conversion publishes, and what it records for the batch's finish step.

Mirror layout: outputs go straight to their place (`<source folders>/<SeriesNumber>_<description>`).
`--layout bids`: a series' BIDS name depends on every other series of the destination (runs are numbered
across series in acquisition order, fieldmaps point at the runs they correct), known only when the batch
is final. So a worker publishes into `DEST/.dicomflow/staging/<item id>/` with the converter's names, and
the finish step (services/finish.py) moves each output to its BIDS name, with the same care as a publish.
Either way the worker records what the finish step needs of the outputs (domain/facts.py), because it
has them on its disk and the finish step does not.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Final

from dicomflow.domain.bids import split_ext
from dicomflow.domain.facts import MAX_THUMBNAILS, OutputImage, SeriesFacts
from dicomflow.domain.model import Item
from dicomflow.domain.paths import join
from dicomflow.services.context import Context

STAGING: Final = ".dicomflow/staging"


def staging_dir(item: Item) -> str:
    return join(STAGING, item.item_id)


def output_dir(item: Item) -> str:
    """The folder (relative to the destination) a conversion of `item` publishes into."""
    return staging_dir(item) if item.layout == "bids" else item.rel_dir


def describe_images(ctx: Context, outputs: Sequence[Path]) -> tuple[OutputImage, ...]:
    """What the report shows of each NIfTI output, read before the profile compresses them (an
    uncompressed image is read three slices at a time, not whole)."""
    images: list[OutputImage] = []
    for path in [p for p in outputs if p.name.endswith((".nii.gz", ".nii"))][:MAX_THUMBNAILS]:
        image = ctx.inspector.describe(path)
        if image is not None:
            images.append(image)
    return tuple(images)


def collect_facts(
    item: Item, images: Sequence[OutputImage], published: Sequence[Path], acquired_at: float | None
) -> SeriesFacts:
    """The facts of a conversion: images by the names they are published under; for BIDS, the published
    sidecars and the acquisition offset."""
    names = {split_ext(p.name)[0]: p.name for p in published}
    named = tuple(replace(i, file=names.get(split_ext(i.file)[0], i.file)) for i in images)
    if item.layout != "bids":
        return SeriesFacts(named)
    sidecars = {}
    for path in published:
        if path.name.endswith(".json"):
            try:
                sidecar = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # the plan sets the output aside: "dcm2niix could not tell what kind of image"
            if isinstance(sidecar, dict):
                sidecars[path.name.removesuffix(".json")] = sidecar
    return SeriesFacts(named, sidecars, acquired_at)
