"""Callers with real tokens for tests: a DevIssuer signs them, dicomflow.auth verifies them exactly as in
the cloud (the keys come straight from the issuer instead of over HTTP)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from dicomflow.auth import IdTokenVerifier, KeyCache, TokenAuthenticator
from dicomflow.config import Settings
from dicomflow.dev_issuer import DevIssuer

API = "https://api.example.test"
TASKS_SA = "dicomflow-tasks@project.iam.gserviceaccount.com"
TASK_URL = "https://worker.example.test/"


def grants(mapping: Mapping[str, Sequence[str]]) -> str:
    return json.dumps({k: list(v) for k, v in mapping.items()})


class Issued:
    """An issuer and the authenticator that trusts it, for one set of settings."""

    def __init__(self, settings: Settings, issuer: DevIssuer | None = None) -> None:
        self.issuer = issuer or DevIssuer()
        keys = KeyCache("in-process", lambda _url: (self.issuer.certs, 3600.0))
        self.authenticator = TokenAuthenticator(
            api=IdTokenVerifier(keys, (self.issuer.issuer,), (API,)),
            tasks=IdTokenVerifier(keys, (self.issuer.issuer,), (TASK_URL,)),
            policy=settings.access_policy,
            tasks_service_account=TASKS_SA,
        )

    def bearer(self, email: str, audience: str = API, **claims: object) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.issuer.token(email, audience, **claims)}"}
