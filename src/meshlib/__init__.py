"""meshlib: an in-process, proxyless service mesh for Python."""

from meshlib.config.model import MeshConfig
from meshlib.errors import (
    ConfigError,
    MeshError,
    NoHealthyEndpointError,
    NoRouteError,
    PolicyIssue,
    UnknownServiceError,
)
from meshlib.mesh import Mesh

__all__ = [
    "ConfigError",
    "Mesh",
    "MeshConfig",
    "MeshError",
    "NoHealthyEndpointError",
    "NoRouteError",
    "PolicyIssue",
    "UnknownServiceError",
]
__version__ = "0.1.0"
