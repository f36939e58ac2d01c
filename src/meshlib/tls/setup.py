"""Building this process's identity provider from the policy's `identity` block."""

from __future__ import annotations

from pathlib import Path

from meshlib.config.model import MeshConfig
from meshlib.errors import MeshError
from meshlib.tls.provider import FileSource, IdentityProvider, LocalCASource


def identity_from_policy(
    config: MeshConfig, service: str | None, base_dir: Path
) -> IdentityProvider | None:
    """The provider the policy asks for, or None when it has no `identity` block.

    Relative paths resolve against ``base_dir`` (the policy file's folder). The
    identity is read once, when the mesh starts: a changed `identity` block takes
    effect at the next start, while the certificates themselves rotate live.
    """
    identity = config.identity
    if identity is None:
        return None
    if identity.ca is not None:
        if service is None:
            raise MeshError(
                "identity.ca issues this process's own certificate: create the mesh with "
                "Mesh(..., service='<name>') so it knows which service it is"
            )
        ca_dir = base_dir / identity.ca.dir
        try:
            source = LocalCASource(
                ca_dir, service, namespace=identity.namespace, ttl=identity.ca.ttl
            )
        except (OSError, ValueError) as exc:
            raise MeshError(f"identity.ca: cannot use the CA in {ca_dir}: {exc}") from exc
        return IdentityProvider(source)
    assert identity.files is not None
    files = identity.files
    try:
        return IdentityProvider(
            FileSource(base_dir / files.cert, base_dir / files.key, base_dir / files.bundle)
        )
    except (OSError, ValueError) as exc:
        raise MeshError(f"identity.files: cannot load the workload certificate: {exc}") from exc
