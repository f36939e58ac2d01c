"""``meshlib top`` and ``meshlib graph``: read a running mesh's admin endpoint."""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

TIMEOUT = 5.0
CLEAR = "\x1b[H\x1b[2J"
_COLUMNS = ("SERVICE", "ROUTE", "RPS", "SUCCESS", "P50 MS", "P95 MS", "P99 MS")


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")


class AdminError(Exception):
    """The admin endpoint could not be read; the message says why."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # a redirect would carry the bearer token to wherever it points
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


# no proxies from the environment: they would see the token, and the admin endpoint
# is usually on loopback anyway
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


def base_url(admin: str) -> str:
    """``host:port`` or ``http(s)://host:port[/prefix]``, without the trailing slash."""
    url = admin if "://" in admin else f"http://{admin}"
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise AdminError(f"--admin {admin!r}: use an http:// or https:// URL")
    return url.rstrip("/")


def fetch(admin: str, path: str, token: str | None) -> tuple[str, bytes]:
    """GET ``path`` from the admin endpoint: its content type and body."""
    url = base_url(admin) + path
    request = urllib.request.Request(url, headers={"Accept": "*/*"})
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with _OPENER.open(request, timeout=TIMEOUT) as response:
            return response.headers.get("Content-Type", ""), bytes(response.read())
    except urllib.error.HTTPError as exc:
        hint = " (pass --token)" if exc.code == 401 else ""
        raise AdminError(f"{url}: {exc.code} {exc.reason}{hint}") from exc
    except urllib.error.URLError as exc:
        raise AdminError(f"cannot reach {url}: {exc.reason}") from exc
    except OSError as exc:  # timeouts and resets while reading the body
        raise AdminError(f"cannot read {url}: {exc}") from exc


def fetch_json(admin: str, path: str, token: str | None) -> Any:
    _, body = fetch(admin, path, token)
    try:
        return json.loads(body)
    except ValueError as exc:
        raise AdminError(f"{base_url(admin)}{path}: not JSON ({exc})") from exc


def _number(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(rows: list[list[str]]) -> list[str]:
    """Columns padded to their widest cell: names left-aligned, numbers right-aligned."""
    table = [list(_COLUMNS), *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(_COLUMNS))]
    lines = []
    for row in table:
        cells = [
            cell.ljust(width) if i < 2 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def render_top(stats: dict[str, Any], admin: str) -> str:
    """One screen of ``meshlib top``: a table per direction, a row per service and route."""
    service = stats.get("service") or "(no service name)"
    window = stats.get("window_seconds")
    lines = [f"meshlib top  {admin}  service {service}  window {_number(window, 'g')} s"]
    for direction in ("outbound", "inbound"):
        lines.append("")
        lines.append(direction)
        rows = []
        for name, entry in sorted(stats.get(direction, {}).items()):
            for route, summary in sorted(entry.get("routes", {}).items()):
                success = summary.get("success_rate")
                rows.append(
                    [
                        name,
                        route,
                        _number(summary.get("rps"), ".1f"),
                        "-" if success is None else f"{success * 100:.1f}%",
                        _number(summary.get("p50_ms"), ".2f"),
                        _number(summary.get("p95_ms"), ".2f"),
                        _number(summary.get("p99_ms"), ".2f"),
                    ]
                )
        lines.extend(format_table(rows) if rows else ["  (no traffic)"])
    return "\n".join(lines)


def cmd_top(args: argparse.Namespace) -> int:
    clear = sys.stdout.isatty()
    shown = 0
    try:
        while True:
            try:
                stats = fetch_json(args.admin, "/stats", args.token)
            except AdminError as exc:
                _err(f"meshlib top: {exc}")
                return 1
            screen = render_top(stats, args.admin)
            sys.stdout.write((CLEAR if clear else "") + screen + "\n")
            sys.stdout.flush()
            shown += 1
            if args.count is not None and shown >= args.count:
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


def cmd_graph(args: argparse.Namespace) -> int:
    try:
        if args.format == "dot":
            _, body = fetch(args.admin, "/graph?format=dot", args.token)
            sys.stdout.write(body.decode("utf-8"))
            return 0
        graph = fetch_json(args.admin, "/graph", args.token)
    except AdminError as exc:
        _err(f"meshlib graph: {exc}")
        return 1
    _out(json.dumps(graph, indent=2))
    return 0


def _positive(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be above 0: {text!r}")
        return value

    return parse


def _admin_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--admin", required=True, metavar="URL", help="the admin endpoint, e.g. 127.0.0.1:9901"
    )
    parser.add_argument("--token", help="bearer token, if the endpoint requires one")


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``top`` and ``graph`` on the top-level subparsers."""
    top = subparsers.add_parser("top", help="live golden metrics from a mesh's admin endpoint")
    _admin_arguments(top)
    top.add_argument(
        "--interval", type=_positive(float), default=2.0, help="seconds between refreshes"
    )
    top.add_argument("--count", type=_positive(int), help="stop after this many refreshes")
    top.set_defaults(run=cmd_top)

    graph = subparsers.add_parser("graph", help="the service graph from a mesh's admin endpoint")
    _admin_arguments(graph)
    graph.add_argument("--format", choices=("json", "dot"), default="json")
    graph.set_defaults(run=cmd_graph)
