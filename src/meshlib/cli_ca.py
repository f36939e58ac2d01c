"""``meshlib ca`` and ``meshlib cert``: a local CA and workload certificates from the shell."""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta
from pathlib import Path

from meshlib.config.durations import parse_duration
from meshlib.tls.ca import DEFAULT_KEY_TYPE, KEY_TYPES, CertificateAuthority
from meshlib.tls.keyfiles import write_public


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")


def _duration(text: str, flag: str) -> timedelta:
    try:
        return timedelta(seconds=parse_duration(text))
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc} (for days use hours, like '8760h')") from exc


def _report(command: str, exc: Exception) -> int:
    _err(f"meshlib {command}: {exc}")
    return 1


def cmd_ca_init(args: argparse.Namespace) -> int:
    try:
        ca = CertificateAuthority.init(
            args.dir,
            args.trust_domain,
            key_type=args.key_type,
            intermediate=args.intermediate,
            ttl=_duration(args.ttl, "--ttl"),
        )
    except (OSError, ValueError) as exc:
        return _report("ca init", exc)
    files = "root.pem, root.key"
    if args.intermediate:
        files += ", intermediate.pem, intermediate.key"
    _out(f"created CA for spiffe://{ca.trust_domain} in {ca.directory} ({files})")
    return 0


def cmd_ca_bundle(args: argparse.Namespace) -> int:
    try:
        bundle = CertificateAuthority.load(args.dir).trust_bundle_pem()
        if args.out is None:
            sys.stdout.write(bundle.decode("ascii"))
            return 0
        path = write_public(args.out, bundle, overwrite=args.overwrite)
    except (OSError, ValueError) as exc:
        return _report("ca bundle", exc)
    _out(f"wrote trust bundle to {path}")
    return 0


def cmd_cert_issue(args: argparse.Namespace) -> int:
    try:
        ttl = _duration(args.ttl, "--ttl")
        ca = CertificateAuthority.load(args.dir)
        issued = ca.issue(args.service, namespace=args.namespace, ttl=ttl, key_type=args.key_type)
        out = args.out if args.out is not None else args.dir
        cert_path, key_path = ca.write_issued(issued, out, overwrite=args.overwrite)
    except (OSError, ValueError) as exc:
        return _report("cert issue", exc)
    expiry = issued.not_after.strftime("%Y-%m-%dT%H:%M:%SZ")
    _out(f"issued {issued.spiffe_id} valid until {expiry}: cert {cert_path}, key {key_path}")
    return 0


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``ca init``, ``ca bundle`` and ``cert issue`` on the top-level subparsers."""
    ca = subparsers.add_parser("ca", help="a local certificate authority for workload identity")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True)

    init = ca_sub.add_parser("init", help="create a CA (root, optionally an intermediate)")
    init.add_argument("--trust-domain", required=True, help="e.g. example.org")
    init.add_argument("--dir", required=True, type=Path, help="directory for the CA files")
    init.add_argument("--intermediate", action="store_true", help="issue from an intermediate")
    init.add_argument("--key-type", choices=KEY_TYPES, default=DEFAULT_KEY_TYPE)
    init.add_argument("--ttl", default="8760h", help="CA lifetime (default 8760h)")
    init.set_defaults(run=cmd_ca_init)

    bundle = ca_sub.add_parser("bundle", help="print the trust bundle (the root certificate)")
    bundle.add_argument("--dir", required=True, type=Path, help="the CA directory")
    bundle.add_argument("--out", type=Path, help="write to this file instead of stdout")
    bundle.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    bundle.set_defaults(run=cmd_ca_bundle)

    cert = subparsers.add_parser("cert", help="workload certificates (X509-SVIDs)")
    cert_sub = cert.add_subparsers(dest="cert_command", required=True)

    issue = cert_sub.add_parser("issue", help="issue a certificate for a service")
    issue.add_argument("--service", required=True)
    issue.add_argument("--namespace", default="default")
    issue.add_argument("--ttl", default="24h", help="certificate lifetime (default 24h)")
    issue.add_argument("--dir", required=True, type=Path, help="the CA directory")
    issue.add_argument("--out", type=Path, help="where to write <service>.pem/.key (default --dir)")
    issue.add_argument("--key-type", choices=KEY_TYPES, help="default: the CA's key type")
    issue.add_argument("--overwrite", action="store_true", help="replace existing files")
    issue.set_defaults(run=cmd_cert_issue)
