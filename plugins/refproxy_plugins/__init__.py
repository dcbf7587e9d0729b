"""The built-in conntrack-cleanup plugins: ``full``, ``targeted``, ``thresholded``.

Contract: each module holds one plugin class registered in refproxy's
``pyproject.toml`` under the entry-point group ``refproxy.cleanup`` — the same
path third-party plugins use, so the built-ins prove it works. Import the
classes through ``refproxy.cleanup.registry``, not from here.
"""
