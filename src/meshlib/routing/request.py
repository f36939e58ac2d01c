"""The protocol-neutral view of a request that routing decides on."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import parse_qsl


class RequestView:
    """Method, path, headers and lazily parsed query of one request.

    ``headers`` must look names up case-insensitively (httpx.Headers does) or
    hold lowercase names.
    """

    __slots__ = ("_query", "headers", "method", "path", "raw_query")

    def __init__(
        self, method: str, path: str, raw_query: str = "", headers: Mapping[str, str] | None = None
    ) -> None:
        self.method = method
        self.path = path
        self.raw_query = raw_query
        self.headers: Mapping[str, str] = headers if headers is not None else {}
        self._query: dict[str, str] | None = None

    @classmethod
    def from_target(cls, method: str, target: str, headers: Mapping[str, str]) -> RequestView:
        path, _, query = target.partition("?")
        return cls(method.upper(), path or "/", query, headers)

    def query(self, name: str) -> str | None:
        if self._query is None:
            # first value wins, like Envoy's query_parameter matcher
            parsed: dict[str, str] = {}
            for key, value in parse_qsl(self.raw_query, keep_blank_values=True):
                parsed.setdefault(key, value)
            self._query = parsed
        return self._query.get(name)

    def header(self, name: str) -> str | None:
        return self.headers.get(name)
