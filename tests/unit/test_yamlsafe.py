"""lab.model.yamlsafe: plain data only, duplicate keys refused, every key's line known."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import yaml

from lab.model import yamlsafe
from lab.model.yamlsafe import YamlError


def refused(text: str) -> YamlError:
    with pytest.raises(YamlError) as info:
        yamlsafe.load(text)
    return info.value


# ---------------------------------------------------------------- plain data and lines


def test_plain_document_keeps_types_and_lines():
    loaded = yamlsafe.load("name: demo\nnodes:\n  count: 3\n  metadata: {role: worker}\netcd:\n  tls: true\n")
    assert loaded.data == {"name": "demo", "nodes": {"count": 3, "metadata": {"role": "worker"}},
                           "etcd": {"tls": True}}
    assert loaded.lines[("name",)] == 1
    assert loaded.lines[("nodes", "count")] == 3
    assert loaded.lines[("etcd", "tls")] == 6


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n"])
def test_empty_document_is_none(text):
    assert yamlsafe.load(text).data is None


def test_line_of_nested_paths_through_lists():
    text = ("forwarded_ports:\n"          # 1
            "  - guest: 80\n"            # 2
            "    host: 8080\n"           # 3
            "  - guest: 443\n"           # 4
            "    host: 8443\n"           # 5
            "nodes:\n"                   # 6
            "  list:\n"                  # 7
            "    - name: node-a\n"       # 8
            "      metadata:\n"          # 9
            "        role: db\n")        # 10
    loaded = yamlsafe.load(text)
    assert loaded.line_of(("forwarded_ports", 1, "host")) == 5
    assert loaded.line_of(("forwarded_ports", 1)) == 4
    assert loaded.line_of(("nodes", "list", 0, "metadata", "role")) == 10
    # pydantic may point below a key that exists (a dict value's key, a union
    # branch): the deepest known prefix answers.
    assert loaded.line_of(("nodes", "list", 0, "metadata", "role", "[key]")) == 10
    assert loaded.line_of(("forwarded_ports", 0, "protocol")) == 2
    assert loaded.line_of(()) == 1


def test_line_of_unknown_path_falls_back_to_the_document():
    assert yamlsafe.load("\n\nname: x\n").line_of(("nodes", "count")) == 3


@pytest.mark.parametrize("text, expected", [
    ("a: !!str 123\n", {"a": "123"}),
    ("a: !!int '7'\n", {"a": 7}),
    ("a: !!bool 'true'\n", {"a": True}),
    ("a: !!null ''\n", {"a": None}),
    ("a: !!float '1.5'\n", {"a": 1.5}),
    ("a: !!map {b: 1}\n", {"a": {"b": 1}}),
    ("a: !!seq [1, 2]\n", {"a": [1, 2]}),
])
def test_core_schema_tags_are_plain_data(text, expected):
    assert yamlsafe.load(text).data == expected


# ---------------------------------------------------------------- duplicate keys


def test_duplicate_top_level_key_names_both_lines():
    error = refused("name: a\nprovider: auto\nname: b\n")
    assert error.line == 3
    assert "duplicate key 'name'" in error.message
    assert "line 1" in error.message


def test_duplicate_nested_key_names_its_path():
    error = refused("etcd:\n  heartbeat_ms: 100\n  tls: true\n  heartbeat_ms: 200\n")
    assert error.line == 4
    assert "'etcd.heartbeat_ms'" in error.message
    assert "line 2" in error.message


def test_duplicate_key_inside_a_list_item():
    error = refused("forwarded_ports:\n  - guest: 80\n    host: 1\n    guest: 81\n")
    assert error.line == 4
    assert "'forwarded_ports[0].guest'" in error.message


def test_duplicate_key_in_flow_mapping():
    error = refused("nodes: {count: 1, count: 2}\n")
    assert error.line == 1
    assert "nodes.count" in error.message


def test_same_key_in_different_mappings_is_fine():
    assert yamlsafe.load("a: {x: 1}\nb: {x: 2}\n").data == {"a": {"x": 1}, "b": {"x": 2}}


# ---------------------------------------------------------------- tags that would run code

# Each payload creates MARKER when constructed by an unsafe loader; `live`
# says whether PyYAML's UnsafeLoader really runs it, which the test proves
# first, so a refusal is known to have stopped real code.
PAYLOADS = {
    "apply-on-sequence": ('name: !!python/object/apply:os.system ["touch MARKER"]\n', True),
    "apply-on-mapping": ('name: !!python/object/apply:os.system {args: ["touch MARKER"]}\n', True),
    "apply-block-sequence": ("nodes:\n  count: !!python/object/apply:os.system\n    - touch MARKER\n", True),
    "open-for-writing": ('nodes:\n  metadata:\n    role: !!python/object/apply:builtins.open ["MARKER", "w"]\n',
                         True),
    "in-a-list": ('synced_folders:\n  - !!python/object/apply:os.system ["touch MARKER"]\n', True),
    "as-a-key": ('? !!python/object/apply:os.system ["touch MARKER"]\n: 1\n', True),
    "through-an-alias": ('x: &x !!python/object/apply:os.system ["touch MARKER"]\nname: *x\n', True),
    "subprocess": ('name: !!python/object/apply:subprocess.check_call [["touch", "MARKER"]]\n', True),
    "in-a-merge": ('nodes:\n  <<: !!python/object/apply:os.system {args: ["touch MARKER"]}\n', False),
    "in-a-merge-list": ('nodes:\n  <<: [!!python/object/apply:os.system {args: ["touch MARKER"]}]\n', False),
    "name-on-scalar": ("provider: !!python/name:os.system\n", False),
    "name-on-sequence": ("provider: !!python/name:os.system [1]\n", False),
    "name-on-mapping": ("provider: !!python/name:os.system {a: 1}\n", False),
    "module": ("provider: !!python/module:os\n", False),
    "tuple": ("nodes: !!python/tuple [1, 2]\n", False),
}


@pytest.mark.parametrize("text, live", PAYLOADS.values(), ids=PAYLOADS.keys())
def test_python_tags_are_refused_and_never_run(text, live, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker, control = tmp_path / "pwned", tmp_path / "control"
    if live:
        yaml.load(text.replace("MARKER", str(control)), Loader=yaml.UnsafeLoader)  # noqa: S506
        assert control.exists(), "the payload is not live: this case would prove nothing"
    error = refused(text.replace("MARKER", str(marker)))
    # A tagged key is refused before its tag is even looked at.
    assert "not allowed" in error.message or "keys must be plain scalars" in error.message
    assert error.line is not None
    assert not marker.exists()


@pytest.mark.parametrize("text, line", [
    ("name: !foo bar\n", 1),
    ("nodes: !Nodes {count: 3}\n", 1),
    ("network:\n  subnet: !Ref LabSubnet\n", 2),
    ("forwarded_ports: !ports [1, 2]\n", 1),
    ("a: !<tag:example.com,2024:thing> 1\n", 1),
    ("a: !!binary aGVsbG8=\n", 1),
    ("a: !!set {x, y}\n", 1),
    ("a: !!omap [x: 1]\n", 1),
    ("a: !!pairs [x: 1]\n", 1),
])
def test_custom_and_non_core_tags_are_refused(text, line):
    error = refused(text)
    assert "tag" in error.message and "not allowed" in error.message
    assert error.line == line


# ---------------------------------------------------------------- syntax errors


@pytest.mark.parametrize("text, line", [
    ("nodes:\n  count: [1, 2\n", 3),                    # unclosed flow sequence: found at end
    ("nodes:\n\tcount: 3\n", 2),                        # tab indentation
    ("nodes:\n  count: 3\n cpus: 2\n", 3),               # indentation
    ("name: lab: x\n", 1),                              # colon in a plain value
    ('name: "unterminated\nprovider: auto\n', 3),       # quote never closed
    ("nodes:\n  <<: *defaults\n", 2),                   # undefined alias
    ("a: 1\n---\nb: 2\n", 2),                           # two documents
])
def test_syntax_errors_carry_a_line(text, line):
    error = refused(text)
    assert error.line == line
    assert error.message.startswith("YAML syntax error")


# ---------------------------------------------------------------- merge keys and aliases


def test_merge_key_copies_a_mapping():
    text = "x-defaults: &d {cpus: 2, memory: 2048}\nnodes:\n  <<: *d\n  count: 5\n"
    assert yamlsafe.load(text).data["nodes"] == {"cpus": 2, "memory": 2048, "count": 5}


def test_merge_key_explicit_keys_win_wherever_they_are_written():
    text = "x: &d {cpus: 2, memory: 2048}\nnodes:\n  cpus: 4\n  <<: *d\n  memory: 512\n"
    assert yamlsafe.load(text).data["nodes"] == {"cpus": 4, "memory": 512}


def test_merge_key_list_first_mapping_wins():
    text = "a: &a {cpus: 1}\nb: &b {cpus: 2, memory: 2048}\nnodes:\n  <<: [*a, *b]\n"
    assert yamlsafe.load(text).data["nodes"] == {"cpus": 1, "memory": 2048}


def test_merged_keys_are_located_at_the_anchor():
    text = "x: &d\n  cpus: 2\n  memory: 2048\nnodes:\n  <<: *d\n"
    loaded = yamlsafe.load(text)
    assert loaded.line_of(("nodes", "memory")) == 3


def test_merge_keys_follow_the_yaml_merge_spec():
    # Written out rather than compared with yaml.safe_load: PyYAML 6.0.3 and
    # 6.0.4 disagree on the nested merge below (6.0.4 loses c's own l: 3).
    text = ("a: &a {k: 1, l: 1}\nb: &b {k: 2, m: 2}\n"
            "c: &c\n  <<: [*a, *b]\n  l: 3\nd:\n  <<: *c\n  n: 4\n")
    assert yamlsafe.load(text).data == {"a": {"k": 1, "l": 1}, "b": {"k": 2, "m": 2},
                                        "c": {"k": 1, "l": 3, "m": 2}, "d": {"k": 1, "l": 3, "m": 2, "n": 4}}


@pytest.mark.parametrize("text", ["nodes:\n  <<: 3\n", "nodes:\n  <<: [{a: 1}, x]\n"])
def test_merge_of_a_non_mapping_is_an_error_with_a_line(text):
    error = refused(text)
    assert error.line == 2
    assert "<<" in error.message


def test_duplicate_key_is_still_refused_next_to_a_merge():
    error = refused("x: &d {cpus: 2}\nnodes:\n  <<: *d\n  count: 1\n  count: 2\n")
    assert error.line == 5


def test_recursive_alias_is_an_error_not_a_crash():
    assert refused("a: &a [1, *a]\n").line == 1
    assert refused("a: &a\n  b: *a\n").line is not None
    assert refused("a: &a\n  <<: *a\n").line is not None


def test_alias_bomb_is_refused_quickly():
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    for level in range(1, 9):
        lines.append(f"l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * 10) + "]")

    def too_slow(signum, frame):
        raise AssertionError("expanding 10**9 aliases: the loader would hang")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.setitimer(signal.ITIMER_REAL, 3)
    try:
        error = refused("\n".join(lines) + "\n")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert "aliases" in error.message


def test_yaml_error_is_a_value_error_with_line():
    error = refused("a: [\n")
    assert isinstance(error, ValueError)
    assert str(error) == error.message


def test_include_style_tags_are_refused(tmp_path: Path, monkeypatch):
    # The loader takes text and never resolves anything against the disk.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "other.yaml").write_text("count: 9\n")
    error = refused("nodes: !include other.yaml\n")
    assert "!include" in error.message
