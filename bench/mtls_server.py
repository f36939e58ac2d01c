"""The mesh's side of bench/mtls.py: bench/server.py's app served by ``Mesh.serve``.

Run by ``bench/mtls.py`` in a subprocess (its own process group)::

    python bench/mtls_server.py --port N --mode disabled
    python bench/mtls_server.py --port N --mode strict --ca-dir DIR

``strict``: the mesh of service ``bench`` with a workload identity issued by the CA
in ``DIR`` (trust domain ``example.org``), TLS only, a client certificate from
that CA required. ``disabled``: the same mesh without identity, plaintext. Both
run the app behind the mesh's ASGI middleware under uvicorn (uvloop, httptools),
so that the two differ only by TLS. Stops on SIGTERM, cleaning up.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from meshlib import Mesh
from server import app  # bench/server.py, a script beside this one

SERVICE = "bench"
TRUST_DOMAIN = "example.org"


def policy(mode: str, ca_dir: str | None) -> dict[str, Any]:
    if mode == "disabled":
        return {"services": {SERVICE: {}}}
    if ca_dir is None:
        raise SystemExit(f"--mode {mode} needs --ca-dir")
    return {
        "trust_domain": TRUST_DOMAIN,
        "identity": {"ca": {"dir": ca_dir, "ttl": "1h"}},
        "services": {SERVICE: {"inbound": {"mtls": mode}}},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument("--mode", choices=["strict", "disabled"], required=True)
    parser.add_argument("--ca-dir", help="the CA directory (strict mode)")
    args = parser.parse_args()
    # uvicorn re-raises the SIGTERM it caught once it has stopped, with the handler it
    # found: this one unwinds through the mesh's close (which removes the workload
    # identity's temporary key files) where the default handler would just end the process
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with Mesh(policy(args.mode, args.ca_dir), service=SERVICE) as mesh:
        mesh.serve(app, service=SERVICE, host="127.0.0.1", port=args.port, mode=args.mode)


if __name__ == "__main__":
    main()
