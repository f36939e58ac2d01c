"""Service discovery: the Registry protocol and its backends."""

from meshlib.discovery.base import Registry, RegistryHealth, Resolution
from meshlib.discovery.file import FileRegistry
from meshlib.discovery.static import StaticRegistry

__all__ = ["FileRegistry", "Registry", "RegistryHealth", "Resolution", "StaticRegistry"]
