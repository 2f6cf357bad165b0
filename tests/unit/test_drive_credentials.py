"""The user OAuth token file written by `dicomflow auth`: private to its owner, and read back."""

from __future__ import annotations

import json
import stat
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from google.oauth2.credentials import Credentials

from dicomflow.adapters.drive.connection import SCOPES, load_user_credentials, save_user_credentials
from dicomflow.domain.failures import ConfigError

pytestmark = pytest.mark.unit


def test_the_token_file_is_private_and_loads_back(tmp_path: Path) -> None:
    expiry = (datetime.now(tz=UTC) + timedelta(hours=1)).replace(tzinfo=None)
    credentials = Credentials(  # type: ignore[no-untyped-call]
        token="access", refresh_token="refresh", token_uri="https://oauth2.googleapis.com/token",
        client_id="id.apps.googleusercontent.com", client_secret="secret", scopes=SCOPES, expiry=expiry,
    )  # fmt: skip
    path = tmp_path / "config" / "drive-token.json"
    save_user_credentials(path, credentials)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text())["refresh_token"] == "refresh"
    loaded = load_user_credentials(path)  # still valid: no refresh, no network
    assert loaded.token == "access" and loaded.refresh_token == "refresh"
    assert time.time() < loaded.expiry.replace(tzinfo=UTC).timestamp()


def test_a_missing_token_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="dicomflow auth"):
        load_user_credentials(tmp_path / "nope.json")
