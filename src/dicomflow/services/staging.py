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
from pathlib import Path
from typing import Final

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


def collect_facts(ctx: Context, item: Item, outputs: Sequence[Path], acquired_at: float | None) -> SeriesFacts:
    """Images for the report (every layout); published sidecars and the acquisition offset for BIDS."""
    images: list[OutputImage] = []
    for path in [p for p in outputs if p.name.endswith((".nii.gz", ".nii"))][:MAX_THUMBNAILS]:
        image = ctx.inspector.describe(path)
        if image is not None:
            images.append(image)
    if item.layout != "bids":
        return SeriesFacts(tuple(images))
    sidecars = {}
    for path in outputs:
        if path.name.endswith(".json"):
            try:
                sidecar = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # the plan sets the output aside: "dcm2niix could not tell what kind of image"
            if isinstance(sidecar, dict):
                sidecars[path.name.removesuffix(".json")] = sidecar
    return SeriesFacts(tuple(images), sidecars, acquired_at)
