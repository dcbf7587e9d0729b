"""The plugin contract over every discovered plugin, and proof it catches bad plugins."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

from refproxy.cleanup.api import API_VERSION, CleanupReport, OptionSpec
from refproxy.conntrack.types import DumpFilter
from refproxy.testing.contract import ContractViolation, check_plugin, parametrize_plugins
from refproxy_plugins.full import FullCleanup
from refproxy_plugins.targeted import TargetedCleanup
from refproxy_plugins.thresholded import ThresholdedCleanup

ROOT = pathlib.Path(__file__).resolve().parents[2]


@parametrize_plugins()
def test_every_discovered_plugin_passes_the_contract(plugin_name):
    result = check_plugin(plugin_name, seeds=range(60))
    assert result.scenarios == 60
    assert result.deleted > 0 and result.injected_failures > 0  # the scenarios had work and faults


@pytest.mark.parametrize(
    "factory, options",
    [
        pytest.param(ThresholdedCleanup, {"max-entries": "1"}, id="thresholded-budget-1"),
        pytest.param(ThresholdedCleanup, {"max-entries": "2", "full-resync-period": "30"}, id="thresholded-resync"),
        pytest.param(TargetedCleanup, {"key-walk-us": "100"}, id="targeted-always-dump"),
        pytest.param(TargetedCleanup, {"dump-entry-us": "1000000"}, id="targeted-always-per-key"),
        pytest.param(TargetedCleanup, {"flush-retired": "false", "full-resync-period": "20"}, id="targeted-no-flush"),
    ],
)
def test_builtin_option_variants_pass_the_contract(factory, options):
    check_plugin(factory, options, seeds=range(60))


# --- the contract must fail bad plugins (else it proves nothing) ------------


class DeletesEveryUdpEntry(FullCleanup):
    """Wrong: trusts the coarse kernel filter instead of the predicate."""

    def cleanup(self, request, table):
        r0 = table.requests
        res = table.delete(table.dump(DumpFilter(proto=17)))
        return CleanupReport(plugin=self.name, deleted=res.deleted, requests=table.requests - r0)


class ForgetsFailures(TargetedCleanup):
    """Wrong: drops the retry queue after each run."""

    def cleanup(self, request, table):
        report = super().cleanup(request, table)
        self._queue = {}
        return report


class ForgetsRetiredFrontends(FullCleanup):
    """Wrong: a deleted Service's entries are forgotten once 'previous' moves on."""

    def cleanup(self, request, table):
        report = super().cleanup(request, table)
        self._carry = frozenset()
        return report


class MiscountsDeletes(FullCleanup):
    def cleanup(self, request, table):
        r = super().cleanup(request, table)
        return CleanupReport(plugin=r.plugin, deleted=r.deleted + 1, requests=r.requests)


class HidesPending(ThresholdedCleanup):
    def cleanup(self, request, table):
        r = super().cleanup(request, table)
        return CleanupReport(plugin=r.plugin, deleted=r.deleted, requests=r.requests, examined=r.examined)


class RaisesOnTableErrors(FullCleanup):
    def cleanup(self, request, table):
        r = super().cleanup(request, table)
        if r.errors:
            raise RuntimeError(r.errors[0])
        return r


class NoRecheck(TargetedCleanup):
    """Wrong: deletes everything its frontend filter returns."""

    def _run_scope(self, scope, index, table, tally, budget, seen, details):
        return super()._run_scope(scope, _everything(index), table, tally, budget, seen, details)


def _everything(index):
    """The index, except that every entry of a frontend counts as stale."""

    class Everything:
        def __getattr__(self, name):
            return getattr(index, name)

        def is_stale(self, e):
            return index.frontend_of(e) is not None

    return Everything()


@pytest.mark.parametrize(
    "factory, options, message",
    [
        pytest.param(DeletesEveryUdpEntry, {}, "deleted a non-stale entry", id="collateral"),
        pytest.param(NoRecheck, {}, "deleted a non-stale entry", id="no-recheck"),
        pytest.param(ForgetsFailures, {}, "stale entries", id="forgets-failures"),
        pytest.param(ForgetsRetiredFrontends, {}, "stale entries", id="forgets-retired"),
        pytest.param(MiscountsDeletes, {}, "report.deleted=", id="miscounts"),
        pytest.param(HidesPending, {"max-entries": "1"}, "reported nothing pending", id="hides-pending"),
        pytest.param(RaisesOnTableErrors, {}, "cleanup() raised RuntimeError", id="raises"),
    ],
)
def test_the_contract_catches_broken_plugins(factory, options, message):
    with pytest.raises(ContractViolation) as exc:
        check_plugin(factory, options, seeds=range(200))
    assert message in str(exc.value)
    assert "replay:" in str(exc.value)


def test_metadata_is_checked():
    class NoDescription(FullCleanup):
        description = ""

    class WrongOptions(FullCleanup):
        options = ("sctp",)

    class FutureApi(FullCleanup):
        api_version = API_VERSION + 1

    for bad, why in ((NoDescription, "description"), (WrongOptions, "OptionSpec"), (FutureApi, "api_version")):
        with pytest.raises(ContractViolation, match=why):
            check_plugin(bad, seeds=range(1))


def test_unbuildable_defaults_are_reported():
    class BadDefault(FullCleanup):
        options = (OptionSpec("sctp", "bool", "perhaps"),)

    with pytest.raises(ContractViolation, match="cannot be built with options"):
        check_plugin(BadDefault, seeds=range(1))


def test_the_template_plugin_passes_the_contract():
    """plugins/template is what third parties copy: it must stay correct."""
    src = ROOT / "plugins" / "template" / "src" / "refproxy_cleanup_example" / "__init__.py"
    spec = importlib.util.spec_from_file_location("refproxy_cleanup_example", src)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("refproxy_cleanup_example", mod)
    spec.loader.exec_module(mod)
    result = check_plugin(mod.PerFrontendCleanup, seeds=range(60))
    assert result.deleted > 0
