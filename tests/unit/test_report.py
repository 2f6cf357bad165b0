"""The report page and the PNG writer, on hand-made inputs (no NIfTI, no dcm2niix)."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from dicomflow.adapters.thumbnails import encode_png
from dicomflow.report import BatchSummary, ImageInfo, ReportOutput, ReportSeries, data_uri, incomplete_flags, render

pytestmark = pytest.mark.unit

SUMMARY = BatchSummary("b1", "Study & <co>", "completed_with_failures", "mirror", 3, 1, 1, 1, 0.0, 3725.0, 40, 2)


def series() -> list[ReportSeries]:
    image = ImageInfo((4, 5, 6, 2), (1.0, 1.0, 2.5, 2.0), 2, encode_png(np.full((3, 4), 200, np.uint8)), (4, 3))
    return [
        ReportSeries("ok", "sub-01/<x>", 2, "bold", "MR", "succeeded",
                     (ReportOutput("sub-01/2_bold.nii.gz", image),),
                     warnings=("dcm2niix used 90 of the 96 files of this series",), files=96, seconds=61.0),
        ReportSeries("sk", "sub-01", 900, "Dose_Report", "SR", "skipped", reason="nothing <to> convert"),
        ReportSeries("dl", "sub-02", 5, "T2w", "MR", "dead_lettered", reason='corrupt "file"',
                     failure_code="conversion_failed", attempts=3),
    ]  # fmt: skip


def test_incomplete_flags_recognise_partial_series() -> None:
    assert incomplete_flags(["dcm2niix used 90 of the 96 files of this series", "Warning: something else"]) == (
        "some files of the series were not used",
    )
    assert incomplete_flags(["dcm2niix converted only part of this series (exit code 8); check the outputs"]) == (
        "only part of the series was converted",
    )
    assert incomplete_flags(["Warning: Missing images? Expected 36 images, but instance number is 72"]) == (
        "slices are missing",
    )
    assert incomplete_flags(["Warning: all is fine"]) == ()


def test_render_escapes_user_data_and_shows_totals_and_reasons() -> None:
    html = render(SUMMARY, series())
    assert "Study &amp; &lt;co&gt;" in html and "sub-01/&lt;x&gt;" in html
    assert "nothing &lt;to&gt; convert" in html and "corrupt &quot;file&quot;" in html
    assert "1:02:05" in html and "1:01" in html  # elapsed 3725 s, a series' 61 s
    assert "0.0 s (download" in render(BatchSummary("b", "", "running", "mirror", 0, 0, 0, 0), [])
    assert "1970-01-01 01:02:05 UTC" in html
    assert '<li class="flag">some files of the series were not used</li>' in html
    assert "shape 4 &times; 5 &times; 6 &times; 2" in html and "2 volumes" in html
    assert f'src="{data_uri(series()[0].outputs[0].image.thumbnail_png or b"")}" width="4" height="3"' in html
    assert html.index("Dead-lettered series (1)") < html.index("Skipped series (1)")


def test_render_is_deterministic_and_independent_of_input_order() -> None:
    assert render(SUMMARY, series()) == render(SUMMARY, list(reversed(series())))


def test_encode_png_writes_a_valid_greyscale_png() -> None:
    image = np.arange(12, dtype=np.uint8).reshape(3, 4)
    png = encode_png(image)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", png[8:16])
    assert (kind, length) == (b"IHDR", 13)
    assert struct.unpack(">IIBBBBB", png[16:29]) == (4, 3, 8, 0, 0, 0, 0)
    idat_at = png.index(b"IDAT") - 4
    (idat_len,) = struct.unpack(">I", png[idat_at : idat_at + 4])
    raw = zlib.decompress(png[idat_at + 8 : idat_at + 8 + idat_len])
    rows = [raw[i * 5 : (i + 1) * 5] for i in range(3)]
    assert all(r[0] == 0 for r in rows) and b"".join(r[1:] for r in rows) == image.tobytes()
    assert png.endswith(b"IEND\xaeB`\x82")
    with pytest.raises(ValueError, match="2D uint8"):
        encode_png(np.zeros((2, 2), dtype=np.uint16))
