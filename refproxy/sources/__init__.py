"""Sources of Services and EndpointSlices: the kube API (list/watch), manifest files.

``refproxy.sources.base`` defines the :class:`Source` protocol the proxier
uses; ``files`` and ``kube`` implement it; ``node`` holds the pure readers of
the proxy's own Node. Nothing is imported here, so importing the pure
``refproxy.sources.node`` loads no I/O edge (docs/design.md, "Module map and
layering"); import the submodule you need.
"""
