"""The workload identity of this process: its certificate, key and trust bundle,
renewed before they expire, without a restart.

Two sources: a local CA (`meshlib ca init`) that issues a fresh certificate at
2/3 of the current one's lifetime, or files that another agent (SPIRE, cert-manager,
a script) rewrites, re-read when they change. Every consumer asks the provider at
the moment it opens a connection, so new connections use the newest certificate
while open ones finish on theirs.
"""

from __future__ import annotations

import logging
import os
import shutil
import ssl
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509

from meshlib.tls.ca import CertificateAuthority
from meshlib.tls.contexts import client_context, server_context
from meshlib.tls.identity import spiffe_ids_of
from meshlib.tls.keyfiles import read_private, write_private, write_public

log = logging.getLogger("meshlib.tls")

RENEW_FRACTION = 2 / 3
"""Renew when this fraction of the certificate's lifetime has passed."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """One generation of the workload's certificate, key and trust bundle."""

    spiffe_id: str
    cert_file: Path
    key_file: Path
    bundle_file: Path
    chain_pem: bytes
    bundle_pem: bytes
    key_pem: bytes = field(repr=False)  # never logged or dumped
    not_before: float  # epoch seconds
    not_after: float
    generation: int

    def renew_at(self, fraction: float = RENEW_FRACTION) -> float:
        return self.not_before + fraction * (self.not_after - self.not_before)


class CredentialSource(Protocol):
    """Where certificates come from."""

    def load(self, generation: int) -> Credentials:
        """The current credentials (issuing new ones if the source is a CA)."""

    def changed(self, current: Credentials) -> bool:
        """Whether the source has newer credentials than ``current`` without waiting
        for the renewal time (files rewritten by another agent)."""

    def describe(self) -> dict[str, Any]: ...


class _Generations:
    """A private folder (0700) holding each generation's files, from which TLS
    contexts are built: a source's own files may be rewritten at any moment, these
    never are. Only the newest two generations are kept; removed on close."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="meshlib-identity-"))
        os.chmod(self.folder, 0o700)
        # removed at interpreter exit even if nobody closes the mesh: it holds keys
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.folder, True)

    def store(
        self, generation: int, chain_pem: bytes, key_pem: bytes, bundle_pem: bytes, origin: str
    ) -> Credentials:
        leaf = x509.load_pem_x509_certificate(chain_pem)
        ids = spiffe_ids_of(leaf)
        if len(ids) != 1:
            raise ValueError(f"{origin}: a workload certificate needs exactly one SPIFFE ID")
        files = [self.folder / f"{generation}.{suffix}" for suffix in ("pem", "key", "bundle")]
        write_public(files[0], chain_pem, overwrite=True)
        write_private(files[1], key_pem, overwrite=True)
        write_public(files[2], bundle_pem, overwrite=True)
        for suffix in ("pem", "key", "bundle"):
            (self.folder / f"{generation - 2}.{suffix}").unlink(missing_ok=True)
        return Credentials(
            spiffe_id=ids[0],
            cert_file=files[0],
            key_file=files[1],
            bundle_file=files[2],
            chain_pem=chain_pem,
            bundle_pem=bundle_pem,
            key_pem=key_pem,
            not_before=leaf.not_valid_before_utc.timestamp(),
            not_after=leaf.not_valid_after_utc.timestamp(),
            generation=generation,
        )

    def close(self) -> None:
        self._cleanup()


class LocalCASource:
    """Issues the workload's certificates from a CA directory on this machine."""

    def __init__(
        self,
        ca_dir: Path,
        service: str,
        *,
        namespace: str = "default",
        ttl: float = 3600.0,
    ) -> None:
        self._ca = CertificateAuthority.load(ca_dir)
        self._ca_dir = ca_dir
        self.service = service
        self.namespace = namespace
        self.ttl = ttl
        self._generations = _Generations()

    def load(self, generation: int) -> Credentials:
        # a short skew: clocks of peers differ a little, and short TTLs must stay short
        skew = timedelta(seconds=min(30.0, self.ttl / 10))
        issued = self._ca.issue(
            self.service,
            namespace=self.namespace,
            ttl=timedelta(seconds=self.ttl),
            not_before_skew=skew,
        )
        return self._generations.store(
            generation,
            issued.chain_pem,
            issued.key_pem,
            self._ca.trust_bundle_pem(),
            f"CA {self._ca_dir}",
        )

    def changed(self, current: Credentials) -> bool:
        return False

    def describe(self) -> dict[str, Any]:
        return {"kind": "local-ca", "ca_dir": str(self._ca_dir), "ttl": self.ttl}

    def close(self) -> None:
        self._generations.close()


class FileSource:
    """Certificate, key and bundle files kept fresh by another agent."""

    def __init__(self, cert_file: Path, key_file: Path, bundle_file: Path) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.bundle_file = bundle_file
        self._seen: tuple[float, ...] = ()
        self._generations = _Generations()

    def _stamp(self) -> tuple[float, ...]:
        return tuple(
            p.stat().st_mtime_ns for p in (self.cert_file, self.key_file, self.bundle_file)
        )

    def load(self, generation: int) -> Credentials:
        stamp = self._stamp()
        chain_pem = self.cert_file.read_bytes()
        key_pem = read_private(self.key_file)
        bundle_pem = self.bundle_file.read_bytes()
        credentials = self._generations.store(
            generation, chain_pem, key_pem, bundle_pem, str(self.cert_file)
        )
        # a key that does not belong to the certificate fails here, not in a handshake
        client_context(credentials.cert_file, credentials.key_file, credentials.bundle_file)
        self._seen = stamp
        return credentials

    def changed(self, current: Credentials) -> bool:
        try:
            return self._stamp() != self._seen
        except OSError:
            return False  # mid-rewrite: look again on the next poll

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "files",
            "cert": str(self.cert_file),
            "key": str(self.key_file),
            "bundle": str(self.bundle_file),
        }

    def close(self) -> None:
        self._generations.close()


RotateCallback = Callable[[Credentials], None]


class IdentityProvider:
    """The current credentials and the TLS contexts built from them, renewed in the
    background at ``renew_fraction`` of each certificate's lifetime (and, for file
    sources, as soon as the files change)."""

    def __init__(
        self,
        source: CredentialSource,
        *,
        renew_fraction: float = RENEW_FRACTION,
        poll_interval: float = 1.0,
        clock: Callable[[], float] = time.time,
        background: bool = True,
    ) -> None:
        self._source = source
        self._fraction = renew_fraction
        self._poll = poll_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._callbacks: tuple[RotateCallback, ...] = ()
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._credentials = source.load(1)
        self.rotations = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._run, name="meshlib-identity", daemon=True)
            self._thread.start()

    @property
    def spiffe_id(self) -> str:
        return self._credentials.spiffe_id

    def credentials(self) -> Credentials:
        """The newest credentials (renewing first if the background thread is late)."""
        current = self._credentials
        if self._clock() >= current.renew_at(self._fraction) or self._source.changed(current):
            self.refresh()
        return self._credentials

    def client_context(self) -> ssl.SSLContext:
        """The client context of the current generation (built once per generation)."""
        return self._context("client")

    def server_context(self, require_client_cert: bool = True) -> ssl.SSLContext:
        """The server context of the current generation."""
        return self._context("server-strict" if require_client_cert else "server-permissive")

    def on_rotate(self, callback: RotateCallback) -> Callable[[], None]:
        """Call ``callback(credentials)`` after each renewal; returns an unsubscribe."""
        with self._lock:
            self._callbacks = (*self._callbacks, callback)

        def unsubscribe() -> None:
            with self._lock:
                self._callbacks = tuple(c for c in self._callbacks if c is not callback)

        return unsubscribe

    def refresh(self) -> Credentials:
        """Load (or issue) new credentials now; on failure keep the current ones."""
        with self._lock:
            current = self._credentials
            try:
                fresh = self._source.load(current.generation + 1)
            except Exception as exc:  # a broken rewrite or CA must not take the process down
                self.failures += 1
                log.warning("identity renewal failed, keeping %s: %s", current.spiffe_id, exc)
                return current
            self._credentials = fresh
            self._contexts = {}
            self.rotations += 1
            callbacks = self._callbacks
        log.info(
            "workload identity %s renewed (generation %d, valid until %s)",
            fresh.spiffe_id,
            fresh.generation,
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(fresh.not_after)),
        )
        for callback in callbacks:
            try:
                callback(fresh)
            except Exception:
                log.exception("identity rotation callback failed")
        return fresh

    def describe(self) -> dict[str, Any]:
        """For config_dump: who we are and until when; never key material."""
        current = self._credentials
        return {
            "spiffe_id": current.spiffe_id,
            "generation": current.generation,
            "not_before": current.not_before,
            "not_after": current.not_after,
            "renew_at": current.renew_at(self._fraction),
            "rotations": self.rotations,
            "renewal_failures": self.failures,
            "source": self._source.describe(),
        }

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        close = getattr(self._source, "close", None)
        if close is not None:
            close()

    def _context(self, kind: str) -> ssl.SSLContext:
        credentials = self.credentials()
        context = self._contexts.get(kind)
        if context is not None:
            return context
        with self._lock:
            if credentials is not self._credentials:  # rotated meanwhile: build the newest
                credentials = self._credentials
            files = (credentials.cert_file, credentials.key_file, credentials.bundle_file)
            if kind == "client":
                context = client_context(*files)
            else:
                context = server_context(*files, require_client_cert=kind == "server-strict")
            self._contexts[kind] = context
            return context

    def _run(self) -> None:
        while not self._stop.is_set():
            current = self._credentials
            wait = current.renew_at(self._fraction) - self._clock()
            if wait <= 0 or self._source.changed(current):
                self.refresh()
                if self._credentials is current:  # failed: retry soon, not in a busy loop
                    self._stop.wait(min(self._poll, 5.0))
                continue
            self._stop.wait(min(wait, self._poll))
