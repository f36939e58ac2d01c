"""Consistent hashing on a ketama-style ring, plus the hash key extraction."""

from __future__ import annotations

import random
from bisect import bisect_left
from collections.abc import Container, Mapping, Sequence
from hashlib import blake2b

from meshlib.balancing.base import effective_weights
from meshlib.endpoint import Endpoint


def hash64(data: bytes) -> int:
    """The ring's hash: the 8-byte blake2b digest as a big-endian int."""
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "big")


def vnode_counts(weights: Sequence[int], min_ring_size: int, max_ring_size: int) -> list[int]:
    """Virtual nodes per endpoint: ``weight * per_unit``, per_unit a power of two.

    per_unit is the smallest power of two that makes the ring at least
    ``min_ring_size``. Rounding to a power of two (instead of the exact ratio Envoy
    uses) keeps per_unit unchanged when an endpoint joins or leaves in most cases; the
    other endpoints then keep exactly their points, so only the keys of the removed
    endpoint move. It changes only when the total weight crosses
    ``min_ring_size / 2**j``, e.g. 4 <-> 3 equal endpoints at the default size.
    """
    total = sum(weights)
    if not total:
        return []
    if total > max_ring_size:
        return [max(1, w * max_ring_size // total) for w in weights]
    per_unit = 1
    while per_unit * total < min_ring_size:
        per_unit *= 2
    if per_unit * total > max_ring_size:
        # The power of two overshot the cap: the cap wins over min_ring_size.
        per_unit = max_ring_size // total
    return [w * per_unit for w in weights]


class RingHash:
    """Ketama-style consistent hash ring: a key maps to the next endpoint point clockwise.

    Each endpoint gets virtual nodes in proportion to its weight, hashed from
    ``f"{address}_{i}"``, so an endpoint keeps its points whatever the others are.
    Without a key the pick is uniform over the virtual nodes, i.e. by weight (Envoy
    uses a random hash in that case).
    """

    __slots__ = ("_addresses", "_owners", "_points", "endpoints", "ring_size")

    endpoints: tuple[Endpoint, ...]
    ring_size: int

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        min_ring_size: int = 1024,
        max_ring_size: int = 8_388_608,
    ) -> None:
        if min_ring_size < 1 or max_ring_size < min_ring_size:
            raise ValueError(
                f"need 1 <= min_ring_size <= max_ring_size, got {min_ring_size}, {max_ring_size}"
            )
        self.endpoints = tuple(endpoints)
        self._addresses = tuple(e.address for e in self.endpoints)
        counts = vnode_counts(effective_weights(self.endpoints), min_ring_size, max_ring_size)
        ring: list[tuple[int, int]] = []
        for index, (address, count) in enumerate(zip(self._addresses, counts, strict=True)):
            ring.extend((hash64(f"{address}_{i}".encode()), index) for i in range(count))
        # Ties (a 64-bit collision, or the same address twice) sort by endpoint index,
        # so the ring does not depend on construction order.
        ring.sort()
        self._points = [point for point, _ in ring]
        self._owners = [index for _, index in ring]
        self.ring_size = len(ring)

    def pick(
        self, rng: random.Random, key: bytes | None = None, avoid: Container[str] = ()
    ) -> Endpoint | None:
        """The owner of the first ring point at or after hash(key), skipping avoided ones."""
        size = self.ring_size
        if not size:
            return None
        if key is None:
            pos = int(rng.random() * size)
        else:
            # hash64 inlined: a Python call costs ~10% of a keyed pick.
            point = int.from_bytes(blake2b(key, digest_size=8).digest(), "big")
            pos = bisect_left(self._points, point)
            if pos == size:
                pos = 0
        owner = self._owners[pos]
        if avoid and self._addresses[owner] in avoid:
            owner = self._walk(pos, owner, avoid)
        return self.endpoints[owner]

    def _walk(self, pos: int, owner: int, avoid: Container[str]) -> int:
        addresses = self._addresses
        if all(a in avoid for a in addresses):
            return owner
        owners = self._owners
        size = self.ring_size
        while True:
            pos += 1
            if pos == size:
                pos = 0
            candidate = owners[pos]
            if addresses[candidate] not in avoid:
                return candidate

    def __repr__(self) -> str:
        return f"RingHash({len(self.endpoints)} endpoints, ring_size={self.ring_size})"


def hash_key_from(
    headers: Mapping[str, str], cookies: str | None, hash_on: tuple[str, str]
) -> bytes | None:
    """The ring hash key of a request, or None when the request does not carry it.

    ``hash_on`` is ``("header", name)`` (looked up in ``headers``, whose names are
    lowercase) or ``("cookie", name)`` (looked up in the ``Cookie`` header value
    ``cookies``; cookie names are case-sensitive).
    """
    kind, name = hash_on
    if kind == "header":
        value = headers.get(name.lower())
    elif kind == "cookie":
        value = None if cookies is None else cookie_value(cookies, name)
    else:
        raise ValueError(f"hash_on must be ('header', name) or ('cookie', name), not {hash_on!r}")
    # surrogatepass: values decoded with surrogateescape must still hash, not raise.
    return None if value is None else value.encode("utf-8", "surrogatepass")


def cookie_value(cookie_header: str, name: str) -> str | None:
    """Value of the first cookie called ``name`` in a ``Cookie`` header, unquoted."""
    for part in cookie_header.split(";"):
        cookie_name, sep, value = part.partition("=")
        if sep and cookie_name.strip() == name:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            return value
    return None
