"""meshlib: an in-process, proxyless service mesh for Python."""

from meshlib.config.model import MeshConfig
from meshlib.errors import (
    CircuitOpenError,
    ConfigError,
    DeadlineExceeded,
    MeshError,
    NoHealthyEndpointError,
    NoRouteError,
    OverloadedError,
    PolicyIssue,
    RateLimitedError,
    UnknownServiceError,
)
from meshlib.mesh import Mesh

__all__ = [
    "CircuitOpenError",
    "ConfigError",
    "DeadlineExceeded",
    "Mesh",
    "MeshConfig",
    "MeshError",
    "NoHealthyEndpointError",
    "NoRouteError",
    "OverloadedError",
    "PolicyIssue",
    "RateLimitedError",
    "UnknownServiceError",
]
__version__ = "0.1.0"
