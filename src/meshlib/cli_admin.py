"""``meshlib top``, ``meshlib graph`` and ``meshlib tap``: read a running mesh's admin
endpoint."""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
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


def open_stream(admin: str, path: str, token: str | None) -> Any:
    """GET ``path`` and return the response unread, for streaming.

    ``TIMEOUT`` bounds the connect and each read: the ``/tap`` stream writes a
    keep-alive at least every second, so a silent connection is a dead one.
    """
    url = base_url(admin) + path
    request = urllib.request.Request(url, headers={"Accept": "text/event-stream"})
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        return _OPENER.open(request, timeout=TIMEOUT)
    except urllib.error.HTTPError as exc:
        hint = " (pass --token)" if exc.code == 401 else ""
        raise AdminError(f"{url}: {exc.code} {exc.reason}{_error_detail(exc)}{hint}") from exc
    except urllib.error.URLError as exc:
        raise AdminError(f"cannot reach {url}: {exc.reason}") from exc
    except OSError as exc:
        raise AdminError(f"cannot read {url}: {exc}") from exc


def _error_detail(exc: urllib.error.HTTPError) -> str:
    """``": <message>"`` from a JSON ``{"error": ...}`` body, else ``""``."""
    try:
        error = json.loads(exc.read(4096)).get("error")
    except (OSError, ValueError, AttributeError):
        return ""
    return f": {error}" if isinstance(error, str) and error else ""


def read_events(lines: Iterator[bytes]) -> Iterator[tuple[str, str]]:
    """Server-sent events as ``(event type, data)`` from the stream's lines: comments
    skipped, ``data`` lines joined with newlines, the type ``"message"`` by default."""
    kind = ""
    data: list[str] = []
    for raw in lines:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if data:
                yield kind or "message", "\n".join(data)
            kind, data = "", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            kind = value
        elif field == "data":
            data.append(value)


def _lines(response: Any) -> Iterator[bytes]:
    while line := response.readline():
        yield bytes(line)


def _clock(timestamp: Any) -> str:
    if not isinstance(timestamp, int | float):
        return "-"
    seconds = time.strftime("%H:%M:%S", time.localtime(timestamp))
    return f"{seconds}.{int(timestamp * 1000) % 1000:03d}"


def format_event(event: dict[str, Any]) -> str:
    """One line for ``meshlib tap``: time, direction, source→destination, route,
    method, path, status (or the error), duration, endpoint and flags."""
    status = event.get("status")
    outcome = str(status) if status is not None else (event.get("error") or "-")
    duration = event.get("duration_ms")
    fields = [
        _clock(event.get("timestamp")),
        str(event.get("direction") or "-"),
        f"{event.get('source') or '-'}→{event.get('destination') or '-'}",
        str(event.get("route") or "-"),
        str(event.get("method") or "-"),
        str(event.get("path") or "-"),
        str(outcome),
        "-" if not isinstance(duration, int | float) else f"{duration:.1f}ms",
        str(event.get("endpoint") or "-"),
        ",".join(str(flag) for flag in event.get("flags") or ()) or "-",
    ]
    return " ".join(fields)


def tap_path(args: argparse.Namespace) -> str:
    """``/tap`` with the filter of ``args`` as its query."""
    query: dict[str, str] = {}
    for name in ("service", "route", "status", "path_prefix", "direction"):
        value = getattr(args, name)
        if value is not None:
            query[name] = value
    if args.sample is not None:
        query["sample"] = repr(args.sample)
    if args.count is not None:
        query["limit"] = str(args.count)  # the endpoint ends the stream there too
    return "/tap" + ("?" + urllib.parse.urlencode(query) if query else "")


def cmd_tap(args: argparse.Namespace) -> int:
    path = tap_path(args)
    shown = 0
    response = None
    try:
        response = open_stream(args.admin, path, args.token)
        for kind, data in read_events(_lines(response)):
            if kind != "request":
                continue
            if args.json:
                line = data
            else:
                try:
                    line = format_event(json.loads(data))
                except (ValueError, AttributeError) as exc:
                    _err(f"meshlib tap: a malformed event ({exc}): {data[:200]!r}")
                    return 1
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
            shown += 1
            if args.count is not None and shown >= args.count:
                return 0
        _err(f"meshlib tap: {base_url(args.admin)}/tap: the stream ended")
        return 1
    except AdminError as exc:
        _err(f"meshlib tap: {exc}")
        return 1
    except TimeoutError:
        _err(f"meshlib tap: {base_url(args.admin)}/tap: no data for {TIMEOUT:g} s")
        return 1
    except BrokenPipeError:
        return 0  # the reader of our output went away (e.g. `| head`)
    except OSError as exc:
        _err(f"meshlib tap: {base_url(args.admin)}/tap: {exc}")
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        if response is not None:
            response.close()


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
        if args.format in ("dot", "svg"):
            _, body = fetch(args.admin, f"/graph?format={args.format}", args.token)
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


def _sample(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1]: {text!r}")
    return value


def _admin_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--admin", required=True, metavar="URL", help="the admin endpoint, e.g. 127.0.0.1:9901"
    )
    parser.add_argument("--token", help="bearer token, if the endpoint requires one")


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``top``, ``graph`` and ``tap`` on the top-level subparsers."""
    top = subparsers.add_parser("top", help="live golden metrics from a mesh's admin endpoint")
    _admin_arguments(top)
    top.add_argument(
        "--interval", type=_positive(float), default=2.0, help="seconds between refreshes"
    )
    top.add_argument("--count", type=_positive(int), help="stop after this many refreshes")
    top.set_defaults(run=cmd_top)

    graph = subparsers.add_parser("graph", help="the service graph from a mesh's admin endpoint")
    _admin_arguments(graph)
    graph.add_argument("--format", choices=("json", "dot", "svg"), default="json")
    graph.set_defaults(run=cmd_graph)

    tap = subparsers.add_parser(
        "tap", help="live requests from a mesh's admin endpoint, one line each"
    )
    _admin_arguments(tap)
    tap.add_argument("--service", help="only requests to (or served as) this service")
    tap.add_argument("--route", help="only this route")
    tap.add_argument("--status", help="a code (503), a class (5xx) or 'error'")
    tap.add_argument("--path-prefix", metavar="PREFIX", help="only paths under it, e.g. /api")
    tap.add_argument("--direction", choices=("outbound", "inbound"))
    tap.add_argument("--sample", type=_sample, help="the share of matching requests to show")
    tap.add_argument("--count", type=_positive(int), help="stop after this many requests")
    tap.add_argument("--json", action="store_true", help="print each event as JSON")
    tap.set_defaults(run=cmd_tap)
