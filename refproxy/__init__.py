"""refproxy: a reference Kubernetes service proxy with swappable UDP conntrack cleanup."""

__version__ = "0.1.0"
__all__ = ["__version__"]
