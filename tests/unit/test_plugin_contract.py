"""The plugin contract over every discovered plugin, and proof it catches bad plugins."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

from refproxy.cleanup.api import (
    API_VERSION,
    CleanupReport,
    ConntrackError,
    OptionSpec,
    StaleIndex,
)
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


# --- scoped plugins: the contract within the scope, nothing outside it ------


class DnsOnly:
    """Owns the frontends on port 53 only (e.g. a node-local DNS cache's
    proxy): reads each with a kernel filter and deletes what is stale."""

    name = "dns-only"
    api_version = API_VERSION
    description = "stale entries to port-53 frontends only"
    options = ()

    def __init__(self, options):
        self._carry = frozenset()

    def cleanup(self, request, table):
        r0 = table.requests
        index = StaleIndex.for_request(request, also_retired=self._carry)
        errors = []
        deleted = failed = 0

        def stale(flt):
            try:
                for e in table.dump(flt):
                    f = index.frontend_of(e)
                    if f is not None and f.port == 53 and index.is_stale(e):
                        yield e
            except ConntrackError as err:
                errors.append(str(err))

        for f in [f for f in index.frontends if f.port == 53]:
            for flt in f.filters(request.node_addresses):
                res = table.delete(stale(flt))
                deleted += res.deleted + res.not_found
                failed += len(res.failed)
        self._carry = index.retired if (errors or failed) else frozenset()
        return CleanupReport(
            plugin=self.name, deleted=deleted, pending=failed + (1 if errors and not failed else 0),
            requests=table.requests - r0, errors=tuple(errors) + (("delete failed",) if failed else ()),
        )


@pytest.mark.parametrize("scope", [{53}, [53], lambda f: f.port == 53], ids=["set", "list", "predicate"])
def test_a_scoped_plugin_passes_within_its_scope(scope):
    result = check_plugin(DnsOnly, seeds=range(120), scope=scope)
    assert result.deleted > 0 and result.injected_failures > 0 and result.frontends_in_scope > 0


def test_the_same_plugin_fails_unscoped():
    """Unscoped, it owns every frontend and leaves the non-DNS ones stale."""
    with pytest.raises(ContractViolation, match="stale entries") as exc:
        check_plugin(DnsOnly, seeds=range(120))
    assert "scope=" not in str(exc.value)


def test_deleting_outside_the_scope_is_a_violation():
    with pytest.raises(ContractViolation, match="outside its scope") as exc:
        check_plugin(FullCleanup, seeds=range(120), scope={53})
    assert "scope=SCOPE" in str(exc.value)


def test_a_scope_that_leaves_out_some_dns_frontends_fails_dns_only():
    """Scope narrower than what the plugin cleans: ClusterIPs only, so its
    deletes on ExternalIP/LoadBalancer :53 frontends are outside."""
    from refproxy.testing.scenarios import CLUSTER_IPS

    with pytest.raises(ContractViolation, match="outside its scope"):
        check_plugin(DnsOnly, seeds=range(200), scope=lambda f: f.port == 53 and f.ip in CLUSTER_IPS)


def test_a_scope_selecting_nothing_checks_nothing_and_says_so():
    """A plugin that does nothing passes every per-run check for a scope no
    scenario has; that must not read as a pass."""

    class DoesNothing(DnsOnly):
        def cleanup(self, request, table):
            return CleanupReport(plugin=self.name)

    with pytest.raises(ContractViolation, match="selects no frontend"):
        check_plugin(DoesNothing, seeds=range(5), scope={9999})
    with pytest.raises(ContractViolation, match="stale entries"):
        check_plugin(DoesNothing, seeds=range(5), scope={53})


@pytest.mark.parametrize("scope", [set(), {0}, {"53"}, {70000}])
def test_a_malformed_scope_is_refused(scope):
    with pytest.raises(ValueError, match="scope"):
        check_plugin(DnsOnly, seeds=range(1), scope=scope)


def test_the_template_plugin_passes_the_contract():
    """plugins/template is what third parties copy: it must stay correct."""
    src = ROOT / "plugins" / "template" / "src" / "refproxy_cleanup_example" / "__init__.py"
    spec = importlib.util.spec_from_file_location("refproxy_cleanup_example", src)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("refproxy_cleanup_example", mod)
    spec.loader.exec_module(mod)
    result = check_plugin(mod.PerFrontendCleanup, seeds=range(60))
    assert result.deleted > 0
