"""A local certificate authority issuing X509-SVIDs (SPIFFE workload certificates).

Layout of a CA directory::

    root.pem            root certificate: the trust bundle peers load (0644)
    root.key            root private key, PKCS8 PEM (0600)
    intermediate.pem    optional issuing CA signed by the root (0644)
    intermediate.key    its private key (0600)

Workload certificates follow the X509-SVID profile: an empty subject, exactly one URI
SAN (the SPIFFE ID, marked critical because the subject is empty, RFC 5280 4.2.1.6),
and no DNS names, so identity is never read from a CN or a hostname.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshlib.tls.identity import (
    SCHEME_PREFIX,
    parse_spiffe_id,
    spiffe_ids_of,
    validate_trust_domain,
    workload_id,
)
from meshlib.tls.keyfiles import StrPath, read_private, write_private, write_public

log = logging.getLogger("meshlib.tls.ca")

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

KEY_TYPES: Final = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072")
DEFAULT_KEY_TYPE: Final = "ec-p256"

ROOT_CERT = "root.pem"
ROOT_KEY = "root.key"
INTERMEDIATE_CERT = "intermediate.pem"
INTERMEDIATE_KEY = "intermediate.key"

# backdate so peers whose clocks run slightly behind accept a fresh certificate
DEFAULT_SKEW = timedelta(seconds=30)


def generate_key(key_type: str) -> PrivateKey:
    """A new private key of one of :data:`KEY_TYPES`."""
    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type in ("rsa-2048", "rsa-3072"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[4:]))
    raise ValueError(f"unknown key type {key_type!r}: use one of {', '.join(KEY_TYPES)}")


def _hash_for(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384:
    # match the hash strength to the signing key (P-384 pairs with SHA-384)
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _serial() -> int:
    # 159 random bits: positive and at most 20 octets in DER, as RFC 5280 requires
    while True:
        serial = secrets.randbits(159)
        if serial:
            return serial


def _now() -> datetime:
    # certificates carry whole seconds; truncating keeps reported times equal to the cert's
    return datetime.now(UTC).replace(microsecond=0)


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _same_public_key(cert: x509.Certificate, key: PrivateKey) -> bool:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return cert.public_key().public_bytes(der, spki) == key.public_key().public_bytes(der, spki)


def _load_key(path: Path) -> PrivateKey:
    key = serialization.load_pem_private_key(read_private(path), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError(f"{path}: unsupported key type {type(key).__name__} (use EC or RSA)")
    return key


def _load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    """A workload certificate and its key. The repr never shows the key."""

    spiffe_id: str
    cert_pem: bytes
    chain_pem: bytes
    key_pem: bytes = field(repr=False)
    not_before: datetime
    not_after: datetime

    def __repr__(self) -> str:
        return (
            f"IssuedCertificate(spiffe_id={self.spiffe_id!r}, "
            f"not_before={self.not_before.isoformat()}, not_after={self.not_after.isoformat()})"
        )


class CertificateAuthority:
    """A root CA, optionally with an intermediate that does the issuing.

    Create one with :meth:`init` or :meth:`load`, not the constructor.
    """

    def __init__(
        self,
        directory: Path,
        trust_domain: str,
        root_cert: x509.Certificate,
        root_key: PrivateKey,
        intermediate: tuple[x509.Certificate, PrivateKey] | None = None,
    ) -> None:
        self.directory = directory
        self._trust_domain = trust_domain
        self._root_cert = root_cert
        self._root_key = root_key
        self._intermediate = intermediate

    # -- creation -------------------------------------------------------------------

    @classmethod
    def init(
        cls,
        directory: StrPath,
        trust_domain: str,
        *,
        key_type: str = DEFAULT_KEY_TYPE,
        intermediate: bool = False,
        ttl: timedelta = timedelta(days=365),
    ) -> CertificateAuthority:
        """Create a new CA in ``directory`` (made 0700 if missing) and write its files.

        Raises FileExistsError if a CA is already there, ValueError for a bad trust domain,
        key type or ttl.
        """
        validate_trust_domain(trust_domain)
        if key_type not in KEY_TYPES:
            raise ValueError(f"unknown key type {key_type!r}: use one of {', '.join(KEY_TYPES)}")
        if ttl <= timedelta(0):
            raise ValueError(f"CA ttl must be positive (got {ttl})")
        folder = Path(directory)
        names = [ROOT_CERT, ROOT_KEY, INTERMEDIATE_CERT, INTERMEDIATE_KEY]
        existing = [str(folder / name) for name in names if (folder / name).exists()]
        if existing:
            raise FileExistsError(
                f"a CA already exists in {folder} ({', '.join(existing)}); "
                "refusing to replace it (load it, or remove those files first)"
            )
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)

        now = _now()
        not_before = now - DEFAULT_SKEW
        td_san = x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(f"{SCHEME_PREFIX}{trust_domain}")]
        )
        root_key = generate_key(key_type)
        root_name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshlib"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"meshlib root CA {trust_domain}"),
            ]
        )
        root_cert = (
            x509.CertificateBuilder()
            .subject_name(root_name)
            .issuer_name(root_name)
            .public_key(root_key.public_key())
            .serial_number(_serial())
            .not_valid_before(not_before)
            .not_valid_after(now + ttl)
            .add_extension(
                x509.BasicConstraints(ca=True, path_length=1 if intermediate else 0), critical=True
            )
            .add_extension(_ca_key_usage(), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False
            )
            .add_extension(td_san, critical=False)
            .sign(root_key, _hash_for(root_key))
        )

        inter: tuple[x509.Certificate, PrivateKey] | None = None
        if intermediate:
            inter_key = generate_key(key_type)
            inter_name = x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshlib"),
                    x509.NameAttribute(
                        NameOID.COMMON_NAME, f"meshlib intermediate CA {trust_domain}"
                    ),
                ]
            )
            inter_cert = (
                x509.CertificateBuilder()
                .subject_name(inter_name)
                .issuer_name(root_name)
                .public_key(inter_key.public_key())
                .serial_number(_serial())
                .not_valid_before(not_before)
                .not_valid_after(root_cert.not_valid_after_utc)
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(_ca_key_usage(), critical=True)
                .add_extension(
                    x509.SubjectKeyIdentifier.from_public_key(inter_key.public_key()),
                    critical=False,
                )
                .add_extension(
                    x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()),
                    critical=False,
                )
                .add_extension(td_san, critical=False)
                .sign(root_key, _hash_for(root_key))
            )
            inter = (inter_cert, inter_key)

        pem = serialization.Encoding.PEM
        # keys first: if a key cannot be written, no certificate without its key is left
        write_private(folder / ROOT_KEY, _key_pem(root_key))
        write_public(folder / ROOT_CERT, root_cert.public_bytes(pem))
        if inter is not None:
            write_private(folder / INTERMEDIATE_KEY, _key_pem(inter[1]))
            write_public(folder / INTERMEDIATE_CERT, inter[0].public_bytes(pem))
        log.info(
            "created CA for trust domain %s in %s (%s%s)",
            trust_domain,
            folder,
            key_type,
            ", with intermediate" if intermediate else "",
        )
        return cls(folder, trust_domain, root_cert, root_key, inter)

    @classmethod
    def load(cls, directory: StrPath) -> CertificateAuthority:
        """Load the CA in ``directory``; its key files must be 0600.

        Raises FileNotFoundError when there is no CA there, PermissionError for loose key
        permissions, ValueError when the files do not belong together.
        """
        folder = Path(directory)
        if not (folder / ROOT_CERT).is_file():
            raise FileNotFoundError(
                f"no CA in {folder}: {folder / ROOT_CERT} not found (create one with "
                "'meshlib ca init')"
            )
        root_cert = _load_cert(folder / ROOT_CERT)
        root_key = _load_key(folder / ROOT_KEY)
        if not _same_public_key(root_cert, root_key):
            raise ValueError(f"{folder / ROOT_KEY} is not the key of {folder / ROOT_CERT}")
        trust_domain = cls._trust_domain_of(root_cert, folder / ROOT_CERT)

        inter: tuple[x509.Certificate, PrivateKey] | None = None
        has_cert = (folder / INTERMEDIATE_CERT).exists()
        has_key = (folder / INTERMEDIATE_KEY).exists()
        if has_cert != has_key:
            present, missing = (
                (INTERMEDIATE_CERT, INTERMEDIATE_KEY)
                if has_cert
                else (INTERMEDIATE_KEY, INTERMEDIATE_CERT)
            )
            raise ValueError(f"{folder / present} exists but {folder / missing} does not")
        if has_cert:
            inter_cert = _load_cert(folder / INTERMEDIATE_CERT)
            inter_key = _load_key(folder / INTERMEDIATE_KEY)
            if not _same_public_key(inter_cert, inter_key):
                raise ValueError(
                    f"{folder / INTERMEDIATE_KEY} is not the key of {folder / INTERMEDIATE_CERT}"
                )
            try:
                inter_cert.verify_directly_issued_by(root_cert)
            except (ValueError, TypeError, InvalidSignature) as exc:
                raise ValueError(
                    f"{folder / INTERMEDIATE_CERT} was not issued by {folder / ROOT_CERT}: {exc}"
                ) from exc
            inter = (inter_cert, inter_key)
        return cls(folder, trust_domain, root_cert, root_key, inter)

    @staticmethod
    def _trust_domain_of(root_cert: x509.Certificate, path: Path) -> str:
        for uri in spiffe_ids_of(root_cert):
            try:
                parsed = parse_spiffe_id(uri)
            except ValueError:
                continue
            if not parsed.path:
                return parsed.trust_domain
        raise ValueError(f"{path} has no spiffe://<trust domain> URI SAN; not a meshlib CA")

    # -- use ------------------------------------------------------------------------

    @property
    def trust_domain(self) -> str:
        return self._trust_domain

    @property
    def root_certificate(self) -> x509.Certificate:
        return self._root_cert

    @property
    def intermediate_certificate(self) -> x509.Certificate | None:
        return self._intermediate[0] if self._intermediate else None

    def trust_bundle_pem(self) -> bytes:
        """The root certificate as PEM: what peers trust."""
        return self._root_cert.public_bytes(serialization.Encoding.PEM)

    def issue(
        self,
        service: str,
        *,
        namespace: str = "default",
        ttl: timedelta = timedelta(hours=24),
        key_type: str | None = None,
        not_before_skew: timedelta = DEFAULT_SKEW,
    ) -> IssuedCertificate:
        """Issue an X509-SVID for ``spiffe://<trust domain>/ns/<namespace>/sa/<service>``.

        The certificate is valid from ``now - not_before_skew`` until ``now + ttl``, but
        never past the issuing CA's own expiry. ``key_type`` defaults to the CA's.
        """
        if ttl <= timedelta(0):
            raise ValueError(f"certificate ttl must be positive (got {ttl})")
        if not_before_skew < timedelta(0):
            raise ValueError(f"not_before_skew must not be negative (got {not_before_skew})")
        spiffe_id = str(workload_id(self._trust_domain, service, namespace))
        issuer_cert, issuer_key = self._intermediate or (self._root_cert, self._root_key)

        now = _now()
        not_before = now - not_before_skew
        not_after = min(now + ttl, issuer_cert.not_valid_after_utc)
        if not_after <= now:
            raise ValueError(
                f"the issuing CA certificate expired at {issuer_cert.not_valid_after_utc}; "
                "create a new CA"
            )
        if not_after < now + ttl:
            log.warning(
                "certificate for %s capped at the CA's expiry %s (asked for %s)",
                spiffe_id,
                not_after,
                ttl,
            )

        key = generate_key(key_type or self._key_type(issuer_key))
        is_rsa = isinstance(key, rsa.RSAPrivateKey)
        try:
            ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
            aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value)
        except x509.ExtensionNotFound:
            aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(issuer_cert.subject)
            .public_key(key.public_key())
            .serial_number(_serial())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    # RSA key exchange (TLS 1.2 RSA kx) encrypts with the leaf's key
                    key_encipherment=is_rsa,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
                critical=True,
            )
            .add_extension(aki, critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(issuer_key, _hash_for(issuer_key))
        )
        pem = serialization.Encoding.PEM
        cert_pem = cert.public_bytes(pem)
        chain_pem = cert_pem
        if self._intermediate is not None:
            chain_pem += self._intermediate[0].public_bytes(pem)
        log.info("issued certificate for %s, valid until %s", spiffe_id, not_after)
        return IssuedCertificate(
            spiffe_id=spiffe_id,
            cert_pem=cert_pem,
            chain_pem=chain_pem,
            key_pem=_key_pem(key),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
        )

    @staticmethod
    def _key_type(key: PrivateKey) -> str:
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return "ec-p384" if key.curve.key_size >= 384 else "ec-p256"
        return "rsa-3072" if key.key_size >= 3072 else "rsa-2048"

    def write_issued(
        self,
        issued: IssuedCertificate,
        directory: StrPath,
        name: str | None = None,
        overwrite: bool = False,
    ) -> tuple[Path, Path]:
        """Write ``<name>.pem`` (the chain, 0644) and ``<name>.key`` (0600) into ``directory``.

        ``name`` defaults to the service of the SPIFFE ID. Without ``overwrite``, nothing
        is written if either file exists (FileExistsError).
        """
        if name is None:
            name = parse_spiffe_id(issued.spiffe_id).service
            if name is None:
                raise ValueError(f"{issued.spiffe_id} has no service; pass a file name")
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"bad file name {name!r}: give a plain name without '/'")
        folder = Path(directory)
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
        if not overwrite:
            existing = [str(path) for path in (cert_path, key_path) if path.exists()]
            if existing:
                raise FileExistsError(
                    f"{', '.join(existing)} already exist(s); refusing to overwrite "
                    "(remove them, choose another directory, or overwrite explicitly)"
                )
        write_private(key_path, issued.key_pem, overwrite=overwrite)
        write_public(cert_path, issued.chain_pem, overwrite=overwrite)
        return cert_path, key_path
