"""Test helpers for plugin authors: the contract test and scenario generators.

Contract: importable without pytest or hypothesis (``parametrize_plugins``
imports pytest only when called). Everything runs against the in-memory
conntrack table: no root, no kernel.
"""

from refproxy.testing.contract import ContractResult, ContractViolation, check_plugin, parametrize_plugins

__all__ = ["ContractResult", "ContractViolation", "check_plugin", "parametrize_plugins"]
