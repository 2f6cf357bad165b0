"""`layout` in the batch API: refused with the field at fault, or recorded and carried to the dataset
(subjects mapped by folder, a rules file), with the batch's report and status saying when it is written."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dicomflow import bootstrap, samples
from dicomflow.adapters import codec
from dicomflow.config import Settings
from dicomflow.domain.layout import folder_key
from dicomflow.samples_bids import BIDS_RULES
from dicomflow.services.context import Context
from tests.integration.test_http_api import api_client, drain, problem_of
from tests.support.fakes import InlineQueue

pytestmark = pytest.mark.integration

RULES = json.loads(BIDS_RULES)["rules"]


@pytest.fixture
def ctx(make_settings: Callable[..., Settings]) -> Context:
    return bootstrap.build(make_settings(), queue=InlineQueue())


@pytest.mark.parametrize(
    ("layout", "field", "words"),
    [
        ({"kind": "bids", "subject": "01-a"}, "layout.subject", "letters and digits"),
        ({"kind": "bids", "subjects": [{"folder": "a", "subject": "x_1"}]}, "layout.subjects[0].subject", "letters"),
        ({"kind": "bids", "subjects": "a.csv"}, "layout.subjects", "list"),
        ({"kind": "bids", "rules": [{"id": "r", "match": {"SeriesDescription": {"regex": "("}}, "datatype": "func",
                                     "suffix": "bold"}]}, "layout.rules[0].match.SeriesDescription.regex", "regular"),
        ({"kind": "bids", "rules": [{"id": "r", "match": {}}]}, "layout.rules[0].match", "at least one"),
        ({"kind": "mirror", "rules": RULES}, "layout.rules", "bids layout only"),
        ({"kind": "tree"}, "layout.kind", "mirror, bids"),
    ],
)  # fmt: skip
def test_a_bad_layout_is_a_422_naming_the_field(
    ctx: Context, tmp_path: Path, layout: Any, field: str, words: str
) -> None:
    (tmp_path / "in").mkdir()
    body = {"source": str(tmp_path / "in"), "destination": str(tmp_path / "out"), "layout": layout}
    response = api_client(ctx).post("/batches", json=body)
    assert response.status_code == 422
    problem = problem_of(response)
    assert problem["field"] == field and words in problem["detail"], problem
    assert ctx.store.list_batches() == []  # nothing was accepted


def test_a_bids_batch_through_the_api_maps_folders_to_subjects_and_reports_when_its_dataset_is_written(
    ctx: Context, tmp_path: Path
) -> None:
    samples.make_demo_archive(tmp_path / "dicom", seed=4)
    layout = {"kind": "bids", "subjects": [{"folder": "pacs_export", "subject": "sub-09", "session": "a"}],
              "rules": RULES, "fieldmaps": "b0field"}  # fmt: skip
    body = {"source": str(tmp_path / "dicom"), "destination": str(tmp_path / "bids"), "layout": layout}
    client = api_client(ctx)
    accepted = client.post("/batches", json=body)
    assert accepted.status_code == 202, accepted.data
    batch_id = accepted.get_json()["batch_id"]
    drain(ctx)
    status = client.get(f"/batches/{batch_id}").get_json()
    assert status["status"] == "completed_with_failures" and status["finishing"] is False
    assert status["layout"] == {"kind": "bids", "subject": None, "session": None, "subjects": 1,
                                "rules": [r["id"] for r in RULES], "fieldmaps": "b0field"}  # fmt: skip
    assert status["report_ref"] == str(tmp_path / "bids" / "report.html")
    # The PACS export (no sub- folder) became subject 09, session a, through the mapping.
    assert (tmp_path / "bids" / "sub-09" / "ses-a" / "anat").is_dir()
    assert "sub-09\n" in (tmp_path / "bids" / "participants.tsv").read_text()
    # The mapped folder's name is not kept with the batch's layout: only its digest.
    stored = json.dumps(codec.batch_to_dict(ctx.store.get_batch(batch_id))["layout"])
    assert "pacs_export" not in stored and folder_key("pacs_export") in stored


def test_a_watch_keeps_its_layout_for_the_batches_it_starts(ctx: Context) -> None:
    from dicomflow.domain.layout import Layout
    from dicomflow.domain.series import ConversionOptions
    from dicomflow.ports import WatchChannel
    from dicomflow.services.drive_changes import channel_summary

    layout = Layout.bids(subject="03", rules={"rules": RULES})
    channel = WatchChannel("c1", "r1", "F" * 20, "drive://" + "D" * 20, "1", 0.0, 0.0,
                           options=ConversionOptions().to_dict() | {"layout": layout.to_dict()})  # fmt: skip
    ctx.store.put_channel(channel)
    stored = ctx.store.get_channel("c1")
    assert stored is not None and Layout.from_dict(stored.options.get("layout")) == layout
    assert channel_summary(stored)["layout"]["subject"] == "03"
