"""The QA report built from real dcm2niix output, opened the way a browser would (html.parser).

The demo archive is converted series by series with the pinned dcm2niix; one extra series has a name
full of HTML (a user's folder and SeriesDescription are data, not markup). Every converted series must
appear with a thumbnail per NIfTI output that decodes as a PNG of the stated size; skipped and
dead-lettered series must appear with their reasons; nothing may load from outside the page.
"""

from __future__ import annotations

import base64
import struct
import zlib
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest

from dicomflow.adapters.thumbnails import PANEL_HEIGHT, describe
from dicomflow.domain.bids import plan_dataset
from dicomflow.domain.bids_labels import LabelPolicy
from dicomflow.domain.conversion import classify
from dicomflow.domain.failures import DicomflowError
from dicomflow.report import BatchSummary, ReportOutput, ReportSeries, render
from dicomflow.samples import SeriesSpec, make_demo_archive, write_series
from tests.support.bids_pipeline import Converted, convert_all

pytestmark = pytest.mark.integration

HOSTILE = 'T1 <script>alert("x")</script> & <b>'


@dataclass
class Page(HTMLParser):
    images: list[dict[str, str]] = field(default_factory=list)
    rows: dict[str, list[str]] = field(default_factory=dict)
    tags: set[str] = field(default_factory=set)
    text: list[str] = field(default_factory=list)
    _row: str | None = None

    def __post_init__(self) -> None:
        super().__init__()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        self.tags.add(tag)
        if tag == "tr" and "data-series" in values:
            self._row = values["data-series"]
            self.rows.setdefault(self._row, [])
        if tag == "img":
            self.images.append({**values, "row": self._row or ""})

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._row is not None:
            self.rows[self._row].append(data)


def png_size(uri: str) -> tuple[int, int]:
    """Decode a data: URI and check it is a complete, valid greyscale PNG; return (width, height)."""
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix)
    data = base64.b64decode(uri[len(prefix) :], validate=True)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) & 0xFFFFFFFF == crc
        chunks[kind] = body
        pos += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, colour) == (8, 0)
    pixels = zlib.decompress(chunks[b"IDAT"])
    assert len(pixels) == height * (width + 1)
    assert max(pixels) > 0  # the phantom is visible, not a black box
    assert b"IEND" in chunks
    return width, height


def report_series(converted: list[Converted]) -> list[ReportSeries]:
    """What the pipeline would record, with BIDS names for outputs that have one."""
    plan = plan_dataset([c.as_series() for c in converted if c.files], LabelPolicy())
    names = {(o.series_id, f.source): (f.path, o.reason) for o in plan.outputs for f in o.files}
    result = []
    for c in converted:
        sid, group = c.group.key.item_id, c.group
        base = {"series_id": sid, "source": group.rel_dir, "series_number": group.series_number,
                "description": group.description, "modality": group.modality, "files": len(group.files),
                "warnings": c.warnings, "attempts": 1, "seconds": c.seconds}  # fmt: skip
        try:
            verdict = classify(c.exit_code, len([p for p in c.files if p.name.endswith(".nii.gz")]), "")
        except DicomflowError as exc:
            result.append(ReportSeries(**base, state="dead_lettered", reason=exc.reason, failure_code=exc.code))
            continue
        if verdict.skip_reason:
            result.append(ReportSeries(**base, state="skipped", reason=verdict.skip_reason))
            continue
        outputs = tuple(
            ReportOutput(names[(sid, p.name)][0], describe(p), names[(sid, p.name)][1])
            for p in c.files
            if p.name.endswith(".nii.gz")
        )
        result.append(ReportSeries(**base, state="succeeded", outputs=outputs))
    return result


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> list[Converted]:
    base = tmp_path_factory.mktemp("report")
    make_demo_archive(base / "src")
    write_series(
        base / "src" / "sub-05" / "ses-01" / "odd <name> & folder",
        SeriesSpec(kind="mr3d", series_number=7, series_description=HOSTILE, slices=8),
        seed=0,
    )
    return convert_all(base / "src", base / "work")


def test_every_series_appears_with_its_thumbnails_and_reasons(converted: list[Converted]) -> None:
    series = report_series(converted)
    summary = BatchSummary("b-123", "demo <batch>", "completed_with_failures", "bids", len(series),
                           sum(s.state == "succeeded" for s in series), sum(s.state == "skipped" for s in series),
                           sum(s.state == "dead_lettered" for s in series), 1_700_000_000.0, 1_700_000_075.5,
                           files_seen=1000, files_ignored=5)  # fmt: skip
    html = render(summary, series)
    page = Page()
    page.feed(html)
    page.close()

    # Every series is there; every NIfTI output has one thumbnail that decodes to the size it claims.
    assert set(page.rows) == {s.series_id for s in series}
    for s in series:
        if s.state != "succeeded":
            continue
        images = [img for img in page.images if img["row"] == s.series_id]
        assert len(images) == len(s.outputs) >= 1, s.description
        for img, out in zip(images, s.outputs, strict=True):
            assert out.image is not None
            width, height = png_size(img["src"])
            assert (width, height) == (int(img["width"]), int(img["height"])) == out.image.thumbnail_size
            assert height == PANEL_HEIGHT
        text = " ".join(page.rows[s.series_id])
        assert all(out.name in text for out in s.outputs)
        assert (
            " \N{MULTIPLICATION SIGN} ".join(map(str, s.outputs[0].image.shape if s.outputs[0].image else ())) in text
        )

    # Dead-lettered and skipped series carry their reasons.
    states = {s.state for s in series}
    assert {"succeeded", "skipped", "dead_lettered"} <= states
    for s in series:
        if s.state in ("skipped", "dead_lettered"):
            assert s.reason and s.reason in " ".join(page.rows[s.series_id])
    assert any("exported completely" in s.reason for s in series if s.state == "dead_lettered")

    # User data is escaped: it reads back as text, never as markup.
    assert HOSTILE in "".join(page.text) and "odd <name> & folder" in "".join(page.text)
    assert "<script>" not in html and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;b&gt;" in html
    assert page.tags <= {"html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "table", "tr", "th",
                         "td", "b", "br", "span", "code", "ul", "li", "img"}  # fmt: skip
    assert "demo &lt;batch&gt;" in html

    # Self-contained, deterministic, reasonably small.
    assert "http://" not in html.replace("http://www.w3.org", "") and "https://" not in html
    assert all(img["src"].startswith("data:image/png;base64,") for img in page.images)
    assert render(summary, list(reversed(series))) == html
    assert len(html.encode()) < 200_000


def test_thumbnails_show_the_right_views(converted: list[Converted]) -> None:
    """A sagittal T1w (RAS shape 16 x 36 x 40 at 1.5 x 1.1 x 1.2 mm: 24 x 39.6 x 48 mm) gives panels with
    the physical aspect ratio of each view (width x height): sagittal 39.6 x 48 mm, coronal 24 x 48 mm,
    axial 24 x 39.6 mm, each 96 pixels high, 2 pixels apart."""
    t1 = next(c for c in converted if c.group.rel_dir == "sub-01/ses-01/001_T1w_MPRAGE")
    info = describe(next(p for p in t1.files if p.name.endswith(".nii.gz")))
    assert info.shape == (16, 36, 40) and info.volumes == 1
    assert info.voxel_size == pytest.approx((1.5, 1.1, 1.2))
    expected = round(96 * 39.6 / 48) + 2 + round(96 * 24 / 48) + 2 + round(96 * 24 / 39.6)
    assert info.thumbnail_size == (expected, PANEL_HEIGHT)
    dwi = next(c for c in converted if c.group.rel_dir == "sub-01/ses-01/003_DWI_b1000")
    assert describe(next(p for p in dwi.files if p.name.endswith(".nii.gz"))).volumes == 7


def test_a_mid_batch_report_lists_unfinished_series(tmp_path: Path) -> None:
    pending = ReportSeries("p1", "sub-01", 3, "bold", "MR", "running")
    html = render(BatchSummary("b", "", "running", "mirror", 1, 0, 0, 0), [pending])
    assert "Not finished (1)" in html and 'data-series="p1"' in html and "Converted series</h2><p>None." in html


def test_thumbnails_read_the_same_planes_as_a_canonical_copy_of_the_whole_volume(converted: list[Converted]) -> None:
    """The thumbnail reads three mid-slices from the file (not the volume): for every sample output —
    sagittal, axial, oblique, 4D — they are the planes `as_closest_canonical` would give."""
    import nibabel as nib
    import numpy as np

    from dicomflow.adapters.thumbnails import _canonical_plane, _canonical_zooms

    checked = 0
    for c in converted:
        for path in (p for p in c.files if p.name.endswith(".nii.gz")):
            img = nib.load(path)
            canonical = nib.as_closest_canonical(img)
            volume = np.asarray(canonical.dataobj[(slice(None),) * 3 + (0,) * (len(canonical.shape) - 3)])
            nx, ny, nz = volume.shape
            expected = (volume[nx // 2], volume[:, ny // 2], volume[:, :, nz // 2])
            for axis, plane in enumerate(expected):
                assert np.array_equal(_canonical_plane(img, axis), plane.astype(np.float64)), (path.name, axis)
            assert _canonical_zooms(img) == pytest.approx(canonical.header.get_zooms()[:3])
            checked += 1
    assert checked >= 15
