"""The refproxy plugin contract, run against the in-memory conntrack table.

No root needed. A failure names the scenario seed and the run; replay it
with ``check_plugin(PerFrontendCleanup, seeds=[SEED])``.
"""

import pytest
from refproxy_cleanup_example import PerFrontendCleanup

from refproxy.cleanup.api import PluginError
from refproxy.cleanup.registry import load_plugin
from refproxy.testing.contract import check_plugin


def test_contract():
    # A plugin that owns only some frontends says which:
    # check_plugin(MyCleanup, scope={53}) or scope=lambda f: f.port == 53.
    result = check_plugin(PerFrontendCleanup, seeds=range(100))
    assert result.deleted > 0


def test_contract_with_sctp_enabled():
    check_plugin(PerFrontendCleanup, {"sctp": "true"}, seeds=range(30))


def test_bad_option_names_the_plugin():
    with pytest.raises(PluginError, match="per-frontend"):
        PerFrontendCleanup({"sctp": "sometimes"})


def test_registered_under_its_name():
    # Passes once the package is installed (`pip install -e .`): refproxy
    # finds it through the entry point, like `refproxy run --cleanup-plugin per-frontend`.
    try:
        plugin = load_plugin("per-frontend", {})
    except PluginError as err:
        pytest.skip(f"not installed: {err}")
    assert isinstance(plugin, PerFrontendCleanup)
