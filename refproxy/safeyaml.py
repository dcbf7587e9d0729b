"""YAML and JSON loading with bounds on alias expansion and nesting depth.

Contract: :func:`safe_load_all` is ``yaml.safe_load_all`` (libyaml when
available) that refuses, with :class:`LimitError`, documents whose aliases
would expand past a budget ("billion laughs": 720 bytes that stand for
billions of nodes), recursive anchors, and nesting deeper than
``max_depth``; :func:`load_json` is ``json.loads`` with the same depth
bound (and a ``RecursionError`` turned into ``LimitError``). Every manifest
and configuration reader of refproxy should load through here.

Why bound what PyYAML builds as shared references: the loader returns an
aliased node as the *same* Python object, so the load itself is cheap — but
everything after it walks the tree (``json.dumps`` for content versions,
``==`` when the store diffs, ``copy``) and so pays for the full expansion.
The check walks the composed node graph once (each distinct node once,
iteratively) and computes the expanded size arithmetically, before any
Python object is constructed.

Upstream analogue: kube's YAML decoder (sigs.k8s.io/yaml, goyaml.v2
``decode.go``) fails with "document contains excessive aliasing" when most
decoded nodes come from alias expansion in a large document, and rejects an
anchor whose value contains itself. The rule here is simpler: the nodes
reached only through aliases may not exceed ``max(alias_floor, distinct
nodes * alias_ratio)``.

``LimitError`` is both a ``yaml.YAMLError`` and a ``ValueError``, so callers
that already catch either keep working.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import yaml

__all__ = ["LimitError", "safe_load_all", "load_json", "check_depth", "MAX_DEPTH", "ALIAS_FLOOR",
           "ALIAS_RATIO"]

# Kubernetes objects nest about 10 deep (a List of Services with annotations);
# Python's own recursion limit is 1000 and everything downstream recurses.
MAX_DEPTH = 100
# Nodes alias expansion may add: this many, or ALIAS_RATIO times the nodes
# written out, whichever is larger (anchors for shared port lists are fine).
ALIAS_FLOOR = 10_000
ALIAS_RATIO = 1.0

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class LimitError(yaml.YAMLError, ValueError):
    """A document over a bound (alias expansion, recursion, depth); the message says which."""


def _check_node(root: yaml.Node, max_depth: int, alias_floor: int, alias_ratio: float) -> None:
    """Raise LimitError when ``root`` expands too much, refers to itself or nests too deep."""
    size: dict[int, int] = {}  # id(node) -> expanded node count (done)
    depth: dict[int, int] = {}  # id(node) -> expanded depth (done)
    active: set[int] = set()  # on the current path: an alias back to one is a cycle
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        nid = id(node)
        if isinstance(node, yaml.ScalarNode):
            size[nid], depth[nid] = 1, 1
            continue
        kids = [x for pair in node.value for x in pair] if isinstance(node, yaml.MappingNode) else node.value
        if children_done:
            active.discard(nid)
            size[nid] = 1 + sum(size[id(k)] for k in kids)
            depth[nid] = 1 + max((depth[id(k)] for k in kids), default=0)
            if depth[nid] > max_depth:
                raise LimitError(f"document nests deeper than {max_depth} levels{_where(node)}")
            continue
        if nid in size:
            continue
        if len(active) >= max_depth:
            raise LimitError(f"document nests deeper than {max_depth} levels{_where(node)}")
        active.add(nid)
        stack.append((node, True))
        for k in kids:
            if id(k) in active:
                raise LimitError(f"recursive alias: a node contains itself{_where(k)}")
            if id(k) not in size:
                stack.append((k, False))
    distinct = len(size)
    expanded = size[id(root)]
    budget = max(alias_floor, int(distinct * alias_ratio))
    if expanded - distinct > budget:
        raise LimitError(f"document contains excessive aliasing: {distinct} nodes expand to {expanded} "
                         f"(at most {budget} more allowed)")


def _where(node: yaml.Node) -> str:
    mark = getattr(node, "start_mark", None)
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""


def safe_load_all(text: str | bytes, *, max_depth: int = MAX_DEPTH, alias_floor: int = ALIAS_FLOOR,
                  alias_ratio: float = ALIAS_RATIO) -> list[Any]:
    """Every document of ``text`` as ``yaml.safe_load_all`` gives them, within the bounds.

    Raises :class:`LimitError` (a ``yaml.YAMLError``) for a document over a
    bound, ``yaml.YAMLError`` for invalid YAML. Each document is checked
    before it is constructed.
    """
    loader = _LOADER(text)
    docs: list[Any] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                docs.append(None)
                continue
            _check_node(node, max_depth, alias_floor, alias_ratio)
            docs.append(loader.construct_document(node))
    except RecursionError as err:  # a pure-Python composer on a very deep document
        raise LimitError(f"document nests too deep to load: {err}") from err
    finally:
        loader.dispose()
    return docs


def check_depth(obj: Any, max_depth: int = MAX_DEPTH) -> None:
    """Raise :class:`LimitError` when lists/dicts in ``obj`` nest deeper than ``max_depth`` (iterative)."""
    stack = [(obj, 1)]
    while stack:
        cur, d = stack.pop()
        children: Iterable[Any]
        if isinstance(cur, dict):
            children = cur.values()
        elif isinstance(cur, list):
            children = cur
        else:
            continue
        if d > max_depth:
            raise LimitError(f"document nests deeper than {max_depth} levels")
        stack.extend((c, d + 1) for c in children if isinstance(c, (dict, list)))


def load_json(text: str | bytes, *, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads(text)`` within the depth bound; :class:`LimitError` (a ``ValueError``) beyond it."""
    try:
        obj = json.loads(text)
    except RecursionError as err:  # json's C scanner recurses once per level
        raise LimitError(f"document nests deeper than {max_depth} levels (RecursionError)") from err
    check_depth(obj, max_depth)
    return obj
