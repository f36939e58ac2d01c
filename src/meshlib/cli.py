"""The ``meshlib`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from meshlib import cli_admin, cli_ca
from meshlib.config.load import load_policy_file
from meshlib.config.store import SnapshotStore
from meshlib.errors import ConfigError
from meshlib.explain import explain_request, format_explanation
from meshlib.snapshot import Snapshot


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")


def _security_lines(snapshot: Snapshot, name: str) -> list[str]:
    lines = []
    if "identity" in snapshot.policy and name in snapshot.peer_identities:
        lines.append(f"  mutual TLS to it: the server must be {snapshot.peer_identities[name]}")
    security = snapshot.inbound_security.get(name)
    if security is not None and (security.mtls or security.active):
        parts = [f"mtls {security.mtls or 'not set'}"]
        if security.authenticator is not None:
            names = ", ".join(p.name for p in security.authenticator.providers)
            parts.append(f"jwt {names}")
        for policy in security.policies:
            flag = ", dry run" if policy.dry_run else ""
            parts.append(f"authz {policy.name} ({policy.action}{flag})")
        lines.append("  inbound: " + "; ".join(parts))
    return lines


def summarize(snapshot: Snapshot) -> str:
    """What a policy compiles to, service by service."""
    lines = []
    for name, service in snapshot.services.items():
        endpoints = snapshot.clusters[name].endpoints
        lines.append(
            f"service {name}: {len(endpoints)} endpoint(s), lb {snapshot.clusters[name].lb_policy}"
        )
        for cluster in snapshot.clusters.values():
            if cluster.service == name and cluster.subset is not None:
                members = ", ".join(ep.address for ep in cluster.endpoints) or "no endpoints yet"
                lines.append(f"  subset {cluster.subset}: {members}")
        for route in service.routes:
            split = route.action.split
            targets = ", ".join(
                f"{c.name} {100 * w / split.total:g}%"
                for c, w in zip(split.clusters, split.weights, strict=True)
            )
            extras = []
            if route.action.prefix_rewrite is not None:
                extras.append(f"rewrite {route.match_prefix} → {route.action.prefix_rewrite}")
            if route.action.host_rewrite:
                extras.append(f"host → {route.action.host_rewrite}")
            if route.action.mirror is not None:
                mirror = route.action.mirror
                extras.append(f"mirror {mirror.cluster.name} {mirror.fraction * 100:g}%")
            if route.action.timeout is not None:
                extras.append(f"timeout {route.action.timeout:g}s")
            extra = f" [{'; '.join(extras)}]" if extras else ""
            lines.append(f"  route {route.name}: {route.matcher.describe()} → {targets}{extra}")
        lines.extend(_security_lines(snapshot, name))
    identity = snapshot.policy.get("identity")
    if identity is not None:
        source = "local CA " + identity["ca"]["dir"] if "ca" in identity else "files"
        namespace = identity.get("namespace", "default")
        lines.append(
            f"identity: spiffe://{snapshot.trust_domain}/ns/{namespace}/sa/<service> from {source}"
        )
    for path in snapshot.not_enforced:
        lines.append(f"not enforced by this release (accepted, no effect yet): {path}")
    return "\n".join(lines)


def cmd_check(args: argparse.Namespace) -> int:
    try:
        config = load_policy_file(args.file)
    except ConfigError as exc:
        _err(str(exc))
        return 1
    try:
        store = SnapshotStore(config, args.file)
    except ConfigError as exc:
        _err(str(exc))
        return 1
    try:
        problems = [
            f"{args.file}: services.{name}.discovery: {info['error']}"
            for name, info in store.current.discovery.items()
            if info.get("error")
        ]
        for problem in problems:
            _err(problem)
        _out(f"{args.file}: {'OK' if not problems else 'policy OK, discovery failed'}")
        _out(summarize(store.current))
    finally:
        store.close()
    return 1 if problems else 0


def cmd_explain(args: argparse.Namespace) -> int:
    import random

    try:
        config = load_policy_file(args.file)
    except ConfigError as exc:
        _err(str(exc))
        return 1
    headers = {}
    for item in args.header or []:
        name, sep, value = item.partition(":")
        if not sep:
            _err(f"bad header {item!r}: write it as 'name: value'")
            return 2
        headers[name.strip()] = value.strip()
    store = SnapshotStore(config, args.file)
    try:
        result = explain_request(store.current, args.method, args.url, headers, random.Random())
    finally:
        store.close()
    _out(json.dumps(result, indent=2, default=str) if args.json else format_explanation(result))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from meshlib.demo.run import run_demo

    return run_demo(
        requests=args.requests,
        seed=args.seed,
        out=_out,
        serve=args.serve,
        admin_port=args.admin_port,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshlib", description="in-process service mesh")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check", help="validate a policy file and show what it compiles to")
    check.add_argument("file")
    check.set_defaults(run=cmd_check)

    explain = sub.add_parser("explain", help="show where a request would go and why")
    explain.add_argument("file")
    explain.add_argument("method")
    explain.add_argument("url")
    explain.add_argument("-H", "--header", action="append", help="'name: value' (repeatable)")
    explain.add_argument("--json", action="store_true", help="print JSON")
    explain.set_defaults(run=cmd_explain)

    demo = sub.add_parser("demo", help="run demo services on loopback and show the mesh working")
    demo.add_argument("--requests", type=int, default=400)
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument(
        "--serve",
        action="store_true",
        help="keep running with the admin endpoint up and light traffic (Ctrl-C stops)",
    )
    demo.add_argument("--admin-port", type=int, default=0, help="admin port with --serve")
    demo.set_defaults(run=cmd_demo)

    cli_ca.add_commands(sub)
    cli_admin.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    code: int = args.run(args)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
