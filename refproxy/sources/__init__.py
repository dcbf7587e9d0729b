"""Sources of Services and EndpointSlices: the kube API (list/watch), manifest files.

``refproxy.sources.base`` defines the :class:`Source` protocol the proxier
uses; ``files`` and ``kube`` implement it. ``kube`` imports the kubernetes
client, so it is imported only by whoever needs it.
"""

from refproxy.sources.base import Source
from refproxy.sources.files import FilesSource, load_manifests

__all__ = ["Source", "FilesSource", "load_manifests"]
