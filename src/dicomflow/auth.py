"""Who is calling: Google-signed ID tokens, verified in the function itself (issue 11).

IAM already refuses callers without roles/run.invoker before a request reaches a function; the function
verifies the token again (signature against the issuer's published keys, `aud`, `exp`/`iat`, `iss`) and
takes the caller's identity from its `email` claim, because IAM says only *that* someone may call, not
*who*, and batches belong to whoever submitted them. Defence in depth: a misconfigured invoker grant
(allUsers) still lets nobody in without a valid token.

Keys: the issuer publishes them as {key id: PEM certificate} (Google: https://www.googleapis.com/oauth2/v1/certs,
the format google.auth.jwt.decode takes). They are cached for the `max-age` the endpoint sends (Google rotates
keys about daily and announces new ones in advance), and fetched again at most once a minute when a token
names a key id the cache does not hold (a rotation). The dev stack runs its own issuer (dicomflow.dev_issuer)
and points DICOMFLOW_AUTH_CERTS_URL at it, so tests run exactly this code.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from dicomflow.config import Mode, Settings
from dicomflow.domain.access import AccessPolicy, Caller
from dicomflow.domain.failures import Forbidden, ServiceUnavailable, Unauthenticated

CLOCK_SKEW_SECONDS = 30  # tolerance for `iat`/`exp` between Google's clocks and ours
MIN_KEYS_SECONDS = 60.0  # never fetch keys more often than this, even for unknown key ids
MAX_KEYS_SECONDS = 24 * 3600.0
DEFAULT_KEYS_SECONDS = 3600.0  # when the endpoint sends no max-age
_BEARER = re.compile(r"^Bearer +([A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*)\s*$")
# Local mode's one user (and tools that model delivery, not identity): sees everything, owns what the CLI
# owns locally (""), is held to no roots or limits.
LOCAL_CALLER = Caller("", admin=True)

Fetch = Callable[[str], tuple[Mapping[str, str], float]]
"""fetch(certs_url) -> ({key id: PEM certificate}, seconds the answer may be cached)."""


def http_fetch(url: str) -> tuple[Mapping[str, str], float]:
    """The issuer's keys over HTTP(S), with the lifetime its Cache-Control allows."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - the configured issuer's URL
            data = json.loads(response.read())
            cache = response.headers.get("Cache-Control", "")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ServiceUnavailable(f"could not fetch the token issuer's keys ({type(exc).__name__}); try again") from exc
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise ServiceUnavailable("the token issuer's keys are not in the expected format; try again")
    match = re.search(r"max-age=(\d+)", cache)
    return data, float(match.group(1)) if match else DEFAULT_KEYS_SECONDS


class KeyCache:
    """The issuer's public keys, shared by the threads of one process."""

    def __init__(self, url: str, fetch: Fetch = http_fetch, clock: Callable[[], float] = time.monotonic) -> None:
        self.url = url
        self._fetch = fetch
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: Mapping[str, str] = {}
        self._fresh_until = 0.0
        self._fetched_at = float("-inf")
        self.fetches = 0

    def keys(self, key_id: str | None) -> Mapping[str, str]:
        with self._lock:
            now = self._clock()
            stale = now >= self._fresh_until
            rotated = key_id is not None and key_id not in self._keys and now - self._fetched_at >= MIN_KEYS_SECONDS
            if stale or rotated:
                keys, max_age = self._fetch(self.url)
                self.fetches += 1
                self._keys, self._fetched_at = dict(keys), now
                self._fresh_until = now + min(MAX_KEYS_SECONDS, max(MIN_KEYS_SECONDS, max_age))
            return self._keys


@dataclass(frozen=True)
class IdTokenVerifier:
    """Checks a JWT the way an OIDC relying party must: signature by a current key of the issuer,
    an accepted issuer and audience, not expired nor issued in the future, and a verified e-mail."""

    keys: KeyCache
    issuers: tuple[str, ...]
    audiences: tuple[str, ...]

    def verify(self, token: str) -> Mapping[str, Any]:
        if not self.audiences:
            # Without an audience any Google-signed token for any service would pass.
            raise ServiceUnavailable(
                "the API has no token audience configured (DICOMFLOW_AUTH_AUDIENCES or DICOMFLOW_PUBLIC_URL)"
            )
        # Imported here: google.auth (and cryptography) cost ~60 ms, and only the cloud path verifies tokens.
        import google.auth.exceptions  # noqa: PLC0415
        from google.auth import jwt  # noqa: PLC0415

        try:
            header = jwt.decode_header(token)  # type: ignore[no-untyped-call]
            key_id = header.get("kid") if isinstance(header, dict) else None
            if not isinstance(header, dict) or header.get("alg") != "RS256":
                raise Unauthenticated("the bearer token is not an RS256-signed ID token")
            claims: Mapping[str, Any] = jwt.decode(  # type: ignore[no-untyped-call]
                token,
                certs=self.keys.keys(key_id if isinstance(key_id, str) else None),
                audience=list(self.audiences),
                clock_skew_in_seconds=CLOCK_SKEW_SECONDS,
            )
        except (google.auth.exceptions.GoogleAuthError, ValueError, TypeError, KeyError):
            # The library's message may quote claims; the caller learns only that the token was refused.
            raise Unauthenticated("the bearer token is not valid (signature, audience or expiry)") from None
        if claims.get("iss") not in self.issuers:
            raise Unauthenticated("the bearer token was not issued by an accepted issuer")
        email = claims.get("email")
        if not isinstance(email, str) or "@" not in email or claims.get("email_verified") is not True:
            raise Unauthenticated(
                "the bearer token carries no verified e-mail (service accounts: request an ID token with "
                "the e-mail included, e.g. gcloud auth print-identity-token --include-email)"
            )
        return claims


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise Unauthenticated("send an ID token: Authorization: Bearer $(gcloud auth print-identity-token)")
    match = _BEARER.match(authorization)
    if match is None:
        raise Unauthenticated("the Authorization header must be 'Bearer <ID token>'")
    return match.group(1)


class Authenticator(Protocol):
    def caller(self, authorization: str | None) -> Caller:
        """The caller of a batch API request; Unauthenticated (401) without a valid token."""

    def task_sender(self, authorization: str | None) -> None:
        """Check that a task delivery carries the tasks service account's OIDC token; Unauthenticated
        without a valid token, Forbidden for another identity."""


@dataclass(frozen=True)
class TokenAuthenticator:
    api: IdTokenVerifier
    tasks: IdTokenVerifier
    policy: AccessPolicy
    tasks_service_account: str

    def caller(self, authorization: str | None) -> Caller:
        claims = self.api.verify(bearer_token(authorization))
        return self.policy.caller(str(claims["email"]))

    def task_sender(self, authorization: str | None) -> None:
        claims = self.tasks.verify(bearer_token(authorization))
        expected = self.tasks_service_account.lower()
        if not expected or str(claims["email"]).lower() != expected:
            raise Forbidden("tasks are accepted only from dicomflow's Cloud Tasks service account")


@dataclass(frozen=True)
class LocalAuthenticator:
    """Local mode: one machine, one user — whoever can open the state file. No tokens."""

    def caller(self, authorization: str | None) -> Caller:
        return LOCAL_CALLER

    def task_sender(self, authorization: str | None) -> None:
        return None


def authenticator(settings: Settings, fetch: Fetch = http_fetch) -> Authenticator:
    """The cloud verifies every token; local mode has no users (bootstrap.py calls this)."""
    if settings.mode is Mode.LOCAL:
        return LocalAuthenticator()
    keys = KeyCache(settings.auth_certs_url, fetch)
    issuers = tuple(i.strip() for i in settings.auth_issuers.split(",") if i.strip())
    return TokenAuthenticator(
        api=IdTokenVerifier(keys, issuers, settings.audiences),
        tasks=IdTokenVerifier(keys, issuers, settings.task_audiences),
        policy=settings.access_policy,
        tasks_service_account=settings.tasks_service_account,
    )
