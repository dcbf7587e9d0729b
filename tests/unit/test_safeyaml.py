"""Bounded YAML/JSON loading: alias expansion, recursion and depth (issue 10)."""

from __future__ import annotations

import tracemalloc

import pytest
import yaml

from refproxy.safeyaml import LimitError, check_depth, load_json, safe_load_all


def laughs(levels: int = 9, width: int = 9) -> str:
    """The "billion laughs": each level lists ``width`` aliases of the previous one."""
    text = "l0: &l0 [" + ", ".join(['"lol"'] * width) + "]\n"
    for i in range(1, levels):
        text += f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]\n"
    return text


@pytest.mark.parametrize("text", [
    "",
    "---\n---\n42\n---\n- x\n",
    "kind: Service\nmetadata: {name: a}\n---\nkind: EndpointSlice\n",
    "ports: &p [{port: 53, protocol: UDP}]\nagain: *p\nmerged: {<<: {a: 1}, b: 2}\n",
    "a: 2024-01-01\nb: 0x10\nc: yes\nd: ~\n",
])
def test_ordinary_documents_load_as_safe_load_all_does(text):
    assert safe_load_all(text) == list(yaml.safe_load_all(text))


def test_billion_laughs_is_refused_without_allocating():
    bomb = laughs()
    assert len(bomb) < 800  # the 720-byte file: 9**9 expanded nodes
    tracemalloc.start()
    try:
        with pytest.raises(LimitError, match="excessive aliasing"):
            safe_load_all(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak


def test_alias_budget_scales_with_the_document():
    ok = laughs(levels=3, width=9)  # 9**3 nodes through aliases: under the floor
    assert len(safe_load_all(ok)[0]["l2"]) == 9
    with pytest.raises(LimitError):
        safe_load_all(ok, alias_floor=100)


@pytest.mark.parametrize("text", ["a: &a [*a]\n", "a: &a {b: [1, {c: *a}]}\n"])
def test_recursive_anchors_are_refused(text):
    with pytest.raises(LimitError, match="recursive alias"):
        safe_load_all(text)


def test_depth_is_bounded_in_yaml_and_json():
    deep_yaml = "[" * 150 + "]" * 150
    with pytest.raises(LimitError, match="deeper than 100"):
        safe_load_all(deep_yaml)
    assert safe_load_all("[" * 50 + "]" * 50, max_depth=50)
    # Depth reached only through aliases counts too.
    with pytest.raises(LimitError, match="deeper than 10"):
        safe_load_all("a: &a [[[[[1]]]]]\nb: [[[[[[*a]]]]]]\n", max_depth=10)
    with pytest.raises(LimitError, match="deeper than 100"):
        load_json("[" * 150 + "]" * 150)
    with pytest.raises(LimitError, match="RecursionError"):
        load_json("[" * 100_000 + "]" * 100_000)  # json.loads alone raises RecursionError
    assert load_json('{"a": [1, {"b": 2}]}') == {"a": [1, {"b": 2}]}
    check_depth({"a": [[1]]}, max_depth=3)
    with pytest.raises(LimitError):
        check_depth({"a": [[1]]}, max_depth=2)


def test_limit_error_is_caught_where_yaml_or_value_errors_are():
    assert issubclass(LimitError, yaml.YAMLError) and issubclass(LimitError, ValueError)
    with pytest.raises(yaml.YAMLError):
        safe_load_all("a: [\n")
