"""The dev stack's own ID-token issuer: it signs tokens the way Google does, so the functions verify them
with the same code as in production (dicomflow.auth) — only the keys' URL and the issuer name differ.

It holds an RSA key made at start-up (never written to disk), publishes its certificate in Google's
{key id: PEM certificate} format at /certs on 127.0.0.1, and mints RS256 tokens with the claims Google
puts in an ID token (iss, aud, sub, email, email_verified, iat, exp). Tokens for users (the batch API) and
for the tasks service account (Cloud Tasks' OIDC token, added by the dev stack's tasks gateway) alike.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from google.auth import crypt, jwt

ISSUER = "https://dicomflow-dev-issuer.invalid"
TOKEN_SECONDS = 3600  # Google's ID tokens live one hour


class DevIssuer:
    def __init__(self, issuer: str = ISSUER) -> None:
        self.issuer = issuer
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        now = datetime.datetime.now(datetime.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dicomflow dev issuer")])
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .sign(self._key, hashes.SHA256())
        )
        self.certificate = certificate.public_bytes(serialization.Encoding.PEM).decode()
        self.key_id = hashlib.sha256(self.certificate.encode()).hexdigest()[:40]
        self._signer = crypt.RSASigner.from_string(pem, key_id=self.key_id)  # type: ignore[no-untyped-call]
        self._server: ThreadingHTTPServer | None = None
        self.certs_requests = 0

    @property
    def certs(self) -> dict[str, str]:
        return {self.key_id: self.certificate}

    def token(self, email: str, audience: str, *, lifetime: float = TOKEN_SECONDS, **claims: Any) -> str:
        """A signed ID token for `email` (verified) with this audience; `claims` add or override claims."""
        now = int(time.time())
        payload: dict[str, Any] = {
            "iss": self.issuer,
            "aud": audience,
            "sub": hashlib.sha256(email.encode()).hexdigest()[:21],
            "email": email,
            "email_verified": True,
            "iat": now,
            "exp": now + int(lifetime),
        }
        payload.update(claims)
        token: bytes = jwt.encode(self._signer, payload)  # type: ignore[no-untyped-call]
        return token.decode()

    # --- /certs on loopback ---------------------------------------------------------------------------------

    def start(self, host: str = "127.0.0.1") -> str:
        """Serve the keys; returns the certs URL (DICOMFLOW_AUTH_CERTS_URL)."""
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != "/certs":
                    self.send_error(404)
                    return
                issuer.certs_requests += 1
                body = json.dumps(issuer.certs).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Cache-Control", "public, max-age=3600")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: object) -> None:
                return None

        self._server = ThreadingHTTPServer((host, 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self.certs_url

    @property
    def certs_url(self) -> str:
        if self._server is None:
            raise RuntimeError("the dev issuer is not serving")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/certs"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
