"""Workload identity: SPIFFE IDs, their parsing, matching, and extraction from certificates.

A SPIFFE ID is ``spiffe://<trust domain><path>``; meshlib workloads use the
``/ns/<namespace>/sa/<service>`` path shape. See
https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE-ID.md for the rules
:func:`parse_spiffe_id` enforces.
"""

from __future__ import annotations

import functools
import itertools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography import x509

SCHEME_PREFIX = "spiffe://"
MAX_ID_BYTES = 2048
MAX_TRUST_DOMAIN_BYTES = 255

_TRUST_DOMAIN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-_")
_SEGMENT_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-_")


def _trust_domain_problem(trust_domain: str) -> str | None:
    """Why ``trust_domain`` is not a valid SPIFFE trust domain name, or None."""
    if not trust_domain:
        return "trust domain is empty"
    if len(trust_domain.encode()) > MAX_TRUST_DOMAIN_BYTES:
        return f"trust domain is longer than {MAX_TRUST_DOMAIN_BYTES} bytes"
    if "@" in trust_domain:
        return "userinfo ('user@') is not allowed in a SPIFFE ID"
    if ":" in trust_domain:
        return "a port is not allowed in the trust domain"
    for index, char in enumerate(trust_domain):
        if char not in _TRUST_DOMAIN_CHARS:
            if char.isupper():
                return f"trust domain must be lowercase (found {char!r} at position {index})"
            return (
                f"trust domain has invalid character {char!r} at position {index} "
                "(allowed: a-z 0-9 . - _)"
            )
    return None


def _path_problem(path: str) -> str | None:
    """Why ``path`` is not a valid SPIFFE ID path, or None. The empty path is valid."""
    if not path:
        return None
    if not path.startswith("/"):
        return "path must start with '/'"
    if path.endswith("/"):
        return "path must not end with '/'"
    for segment in path[1:].split("/"):
        if not segment:
            return "path has an empty segment ('//')"
        if segment in (".", ".."):
            return f"path segment {segment!r} is not allowed"
        for char in segment:
            if char not in _SEGMENT_CHARS:
                return (
                    f"path segment {segment!r} has invalid character {char!r} "
                    "(allowed: A-Z a-z 0-9 . - _)"
                )
    return None


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A validated SPIFFE ID.

    ``path`` is empty for the trust domain's own ID (``spiffe://example.org``, which CA
    certificates carry) and otherwise starts with ``/``.
    """

    trust_domain: str
    path: str

    def __post_init__(self) -> None:
        problem = _trust_domain_problem(self.trust_domain) or _path_problem(self.path)
        if problem is not None:
            raise ValueError(f"invalid SPIFFE ID: {problem}")
        if len(str(self).encode()) > MAX_ID_BYTES:
            raise ValueError(f"invalid SPIFFE ID: longer than {MAX_ID_BYTES} bytes")

    def __str__(self) -> str:
        return f"{SCHEME_PREFIX}{self.trust_domain}{self.path}"

    def _workload_segments(self) -> tuple[str, str] | None:
        parts = self.path.split("/")
        # "/ns/x/sa/y".split("/") == ["", "ns", "x", "sa", "y"]
        if len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa":
            return parts[2], parts[4]
        return None

    @property
    def namespace(self) -> str | None:
        """The namespace of a ``/ns/<ns>/sa/<sa>`` ID; None for other path shapes."""
        found = self._workload_segments()
        return found[0] if found else None

    @property
    def service(self) -> str | None:
        """The service of a ``/ns/<ns>/sa/<sa>`` ID; None for other path shapes."""
        found = self._workload_segments()
        return found[1] if found else None


def parse_spiffe_id(text: str) -> SpiffeId:
    """Parse ``text`` strictly as a SPIFFE ID; raise ValueError saying what is wrong."""
    if not text:
        raise ValueError("invalid SPIFFE ID: empty string")
    if len(text.encode()) > MAX_ID_BYTES:
        raise ValueError(f"invalid SPIFFE ID: longer than {MAX_ID_BYTES} bytes")
    if not text.startswith(SCHEME_PREFIX):
        if text[: len(SCHEME_PREFIX)].lower() == SCHEME_PREFIX:
            raise ValueError(f"invalid SPIFFE ID {text!r}: scheme must be lowercase 'spiffe'")
        raise ValueError(f"invalid SPIFFE ID {text!r}: scheme must be 'spiffe://'")
    rest = text[len(SCHEME_PREFIX) :]
    if "?" in rest:
        raise ValueError(f"invalid SPIFFE ID {text!r}: a query ('?') is not allowed")
    if "#" in rest:
        raise ValueError(f"invalid SPIFFE ID {text!r}: a fragment ('#') is not allowed")
    trust_domain, slash, path = rest.partition("/")
    path = slash + path
    problem = _trust_domain_problem(trust_domain) or _path_problem(path)
    if problem is not None:
        raise ValueError(f"invalid SPIFFE ID {text!r}: {problem}")
    return SpiffeId(trust_domain, path)


def validate_trust_domain(trust_domain: str) -> str:
    """Return ``trust_domain`` if it is a valid trust domain name, else raise ValueError."""
    problem = _trust_domain_problem(trust_domain)
    if problem is not None:
        hint = ""
        if trust_domain.startswith(SCHEME_PREFIX):
            hint = f" (give the name only, without {SCHEME_PREFIX!r})"
        raise ValueError(f"invalid trust domain {trust_domain!r}: {problem}{hint}")
    return trust_domain


def workload_id(trust_domain: str, service: str, namespace: str = "default") -> SpiffeId:
    """The SPIFFE ID ``spiffe://<trust_domain>/ns/<namespace>/sa/<service>``."""
    validate_trust_domain(trust_domain)
    for label, value in (("service", service), ("namespace", namespace)):
        problem = _path_problem(f"/{value}")
        if problem is not None or "/" in value:
            reason = problem or "it must be a single path segment (no '/')"
            raise ValueError(f"invalid {label} {value!r} for a SPIFFE ID: {reason}")
    return SpiffeId(trust_domain, f"/ns/{namespace}/sa/{service}")


@functools.lru_cache(maxsize=1024)
def _compile_pattern(pattern: str) -> re.Pattern[str]:
    if not pattern:
        raise ValueError("empty SPIFFE ID pattern")
    body = pattern
    suffix_match = body.startswith("*")
    if suffix_match:
        body = body[1:]
    prefix_match = body.endswith("*")
    if prefix_match:
        body = body[:-1]
    if not body:
        raise ValueError(f"bad SPIFFE ID pattern {pattern!r}: use '*' alone to match any ID")
    if not suffix_match and not body.startswith(SCHEME_PREFIX):
        body = SCHEME_PREFIX + body
    pieces = body.split("*")
    for before, after in itertools.pairwise(pieces):
        if not before.endswith("/") or not after.startswith("/"):
            raise ValueError(
                f"bad SPIFFE ID pattern {pattern!r}: '*' must be the first or last character "
                "or a whole path segment"
            )
    regex = "[A-Za-z0-9._-]+".join(re.escape(piece) for piece in pieces)
    # DOTALL: a hostile SAN may contain newlines; they must not end a wildcard early
    return re.compile(
        (".*" if suffix_match else "") + regex + (".*" if prefix_match else ""), re.DOTALL
    )


def spiffe_matches(pattern: str, spiffe_id: str) -> bool:
    """Whether ``spiffe_id`` matches an Istio-principal-like ``pattern``.

    - ``*`` alone matches any non-empty ID;
    - a leading ``*`` is a suffix match (``*/sa/users``);
    - a trailing ``*`` is a prefix match (``spiffe://example.org/ns/default/*``);
    - ``*`` as a whole segment elsewhere matches exactly one non-empty segment
      (``spiffe://example.org/ns/*/sa/users``, ``spiffe://*/ns/default/sa/users``);
    - anything else is an exact match.

    Patterns may omit the ``spiffe://`` prefix, Istio style (``example.org/ns/default/sa/users``).
    Only a ``*`` written as the pattern's first character is a suffix match, so
    ``spiffe://*/...`` wildcards the trust domain segment only. Raises ValueError for a
    malformed pattern (empty, or ``*`` inside a segment), so validate patterns at load time.
    The ID itself is not validated: peers' IDs should go through :func:`parse_spiffe_id` first.
    """
    if pattern == "*":
        return bool(spiffe_id)
    compiled = _compile_pattern(pattern)
    if not spiffe_id.startswith(SCHEME_PREFIX):
        return False
    return compiled.fullmatch(spiffe_id) is not None


def spiffe_ids_of(cert: x509.Certificate) -> list[str]:
    """The certificate's URI SANs with the ``spiffe`` scheme, in order.

    A valid X509-SVID has exactly one; all are returned so callers can reject more.
    The values are not validated: parse them with :func:`parse_spiffe_id`.
    """
    from cryptography import x509  # imported on use: it costs ~8 MiB

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [
        uri
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier)
        if uri.partition(":")[0].lower() == "spiffe"
    ]


def svid_id(encoded: bytes, *, der: bool = False) -> str:
    """The SPIFFE ID of a certificate in PEM (or DER) bytes: "" unless it parses and
    carries exactly one, as a valid X509-SVID does."""
    from cryptography import x509  # imported on use: it costs ~8 MiB

    try:
        if der:
            certificate = x509.load_der_x509_certificate(encoded)
        else:
            certificate = x509.load_pem_x509_certificate(encoded)
        ids = spiffe_ids_of(certificate)
    except ValueError:
        return ""
    return ids[0] if len(ids) == 1 else ""
