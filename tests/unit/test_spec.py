"""lab.model.spec: defaults, per-node overrides, precedence of the layers, located errors, schema."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from lab.errors import SpecError
from lab.model.catalog import PROVIDER_CHOICES
from lab.model.spec import LabSpec, Override, default_yaml, json_schema, load_spec, parse_set_option

pytestmark = pytest.mark.usefixtures("no_lab_env")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "lab.yaml"
    path.write_text(text)
    return path


def load(tmp_path: Path, text: str | None = None, overrides=(), environ=None) -> LabSpec:
    path = write(tmp_path, text) if text is not None else tmp_path / "lab.yaml"
    return load_spec(path, list(overrides), environ=environ or {}).spec


def error_of(tmp_path: Path, text: str | None = None, overrides=(), environ=None) -> str:
    with pytest.raises(SpecError) as info:
        load(tmp_path, text, overrides, environ)
    return info.value.message


# ---------------------------------------------------------------- defaults


def test_defaults_without_a_file(tmp_path):
    loaded = load_spec(tmp_path / "lab.yaml", environ={})
    assert not loaded.exists
    assert loaded.project_dir == tmp_path
    s = loaded.spec
    assert (s.name, s.provider) == ("lab", "auto")
    assert (s.box.name, s.box.version) == ("labos", "1")
    assert (s.nodes.count, s.nodes.prefix, s.nodes.cpus, s.nodes.memory) == (3, "node", 1, 1024)
    assert s.nodes.members is None and s.nodes.metadata == {}
    assert s.network.subnet is None
    assert (s.etcd.heartbeat_ms, s.etcd.election_timeout_ms, s.etcd.tls) == (100, 1000, True)
    assert (s.updates.strategy, s.updates.max_concurrent_reboots) == ("etcd-lock", 1)
    assert s.forwarded_ports == [] and s.synced_folders == []
    assert s.providers.libvirt.driver == "auto"  # settled per host by the libvirt provider


def test_default_nodes_are_node_1_to_3():
    nodes = LabSpec().node_specs()
    assert [(n.name, n.index, n.cpus, n.memory, n.metadata) for n in nodes] == [
        ("node-1", 1, 1, 1024, {}), ("node-2", 2, 1, 1024, {}), ("node-3", 3, 1, 1024, {})]


@pytest.mark.parametrize("text", ["", "# nothing yet\n", "---\n", "{}\n"])
def test_empty_file_means_defaults(tmp_path, text):
    loaded = load_spec(write(tmp_path, text), environ={})
    assert loaded.exists
    assert loaded.spec == LabSpec()


def test_count_and_prefix_name_the_nodes(tmp_path):
    s = load(tmp_path, "nodes:\n  count: 2\n  prefix: etcd\n  cpus: 2\n  memory: 2048\n")
    assert [(n.name, n.cpus, n.memory) for n in s.node_specs()] == [("etcd-1", 2, 2048), ("etcd-2", 2, 2048)]


def test_node_list_overrides_per_node_and_inherits_the_rest(tmp_path):
    s = load(tmp_path, """\
nodes:
  count: 7            # ignored: the list decides
  cpus: 2
  memory: 2048
  metadata: {role: worker, zone: a}
  list:
    - name: db
      memory: 4096
      metadata: {role: database}
    - name: web
      cpus: 4
    - name: cache
""")
    nodes = {n.name: n for n in s.node_specs()}
    assert list(nodes) == ["db", "web", "cache"]
    assert [n.index for n in nodes.values()] == [1, 2, 3]
    assert (nodes["db"].cpus, nodes["db"].memory) == (2, 4096)
    assert nodes["db"].metadata == {"role": "database", "zone": "a"}
    assert (nodes["web"].cpus, nodes["web"].memory) == (4, 2048)
    assert nodes["web"].metadata == {"role": "worker", "zone": "a"}
    assert (nodes["cache"].cpus, nodes["cache"].memory) == (2, 2048)


def test_node_list_metadata_is_not_shared_between_nodes():
    s = LabSpec.model_validate({"nodes": {"metadata": {"a": "1"}, "list": [{"name": "x"}, {"name": "y"}]}})
    first, second = s.node_specs()
    first.metadata["b"] = "2"
    assert second.metadata == {"a": "1"}
    assert s.nodes.metadata == {"a": "1"}


def test_forwarded_port_to_a_listed_node(tmp_path):
    s = load(tmp_path, "nodes:\n  list: [{name: db}]\nforwarded_ports:\n  - {guest: 5432, host: 15432, node: db}\n")
    assert s.forwarded_ports[0].node == "db"
    assert s.forwarded_ports[0].protocol == "tcp"


def test_same_host_port_on_tcp_and_udp_is_fine(tmp_path):
    s = load(tmp_path, "forwarded_ports:\n  - {guest: 53, host: 5353}\n  - {guest: 53, host: 5353, protocol: udp}\n")
    assert len(s.forwarded_ports) == 2


@pytest.mark.parametrize("word", ["off", "reboot", "etcd-lock"])
def test_update_strategies_as_written_in_yaml(tmp_path, word):
    # A bare `off` is false in YAML 1.1; it still means the strategy "off".
    assert load(tmp_path, f"updates:\n  strategy: {word}\n").updates.strategy == word


def test_subnet_is_parsed(tmp_path):
    s = load(tmp_path, "network:\n  subnet: 192.168.77.0/24\n")
    assert s.network.subnet == ipaddress.IPv4Network("192.168.77.0/24")


def test_yaml_anchors_and_merge_keys_can_share_settings(tmp_path):
    s = load(tmp_path, "nodes:\n  list:\n    - &big {name: db, memory: 4096, cpus: 2}\n"
                       "    - {<<: *big, name: db-replica}\n")
    assert [(n.name, n.memory, n.cpus) for n in s.node_specs()] == [("db", 4096, 2), ("db-replica", 4096, 2)]


# ---------------------------------------------------------------- precedence

FILE = "name: from-file\nprovider: nspawn\nnodes:\n  count: 5\netcd:\n  tls: false\n"


def test_file_beats_defaults(tmp_path):
    s = load(tmp_path, FILE)
    assert (s.name, s.provider, s.nodes.count, s.etcd.tls) == ("from-file", "nspawn", 5, False)
    assert s.nodes.cpus == 1  # what the file does not say stays default


@pytest.mark.parametrize("var, value, attr, expected", [
    ("LAB_NODES", "4", ("nodes", "count"), 4),
    ("LAB_NAME", "from-env", ("name",), "from-env"),
    ("LAB_PROVIDER", "libvirt", ("provider",), "libvirt"),
    ("LAB_SUBNET", "10.77.3.0/24", ("network", "subnet"), ipaddress.IPv4Network("10.77.3.0/24")),
    ("LAB_BOX_VERSION", "2", ("box", "version"), "2"),
    ("LAB_BOX_VERSION", "2.1-rc1", ("box", "version"), "2.1-rc1"),
    ("LAB_SPEC__ETCD__TLS", "true", ("etcd", "tls"), True),
    ("LAB_SPEC__NODES__COUNT", "6", ("nodes", "count"), 6),
    ("LAB_SPEC__NODES__MEMORY", "2048", ("nodes", "memory"), 2048),
    ("LAB_SPEC__UPDATES__STRATEGY", "off", ("updates", "strategy"), "off"),
    ("LAB_SPEC__PROVIDERS__LIBVIRT__DRIVER", "qemu", ("providers", "libvirt", "driver"), "qemu"),
])
def test_env_beats_file(tmp_path, var, value, attr, expected):
    s = load(tmp_path, FILE, environ={var: value})
    got = s
    for part in attr:
        got = getattr(got, part)
    assert got == expected


def test_generic_env_reaches_aliased_and_structured_keys(tmp_path):
    s = load(tmp_path, FILE, environ={"LAB_SPEC__NODES__LIST": "[{name: a}, {name: b, memory: 512}]",
                                      "LAB_SPEC__FORWARDED_PORTS": "[{guest: 80, host: 8080, node: b}]"})
    assert [(n.name, n.memory) for n in s.node_specs()] == [("a", 1024), ("b", 512)]
    assert s.forwarded_ports[0].node == "b"


def test_env_reads_the_real_environment_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv("LAB_NODES", "2")
    assert load_spec(tmp_path / "lab.yaml").spec.nodes.count == 2


def test_unrelated_env_is_ignored(tmp_path):
    s = load(tmp_path, FILE, environ={"LABX": "1", "LAB": "x", "NODES": "9", "LAB_FILE": "other.yaml"})
    assert s.nodes.count == 5


def test_set_flag_beats_env(tmp_path):
    s = load(tmp_path, FILE, [parse_set_option("nodes.count=2"), parse_set_option("etcd.tls=true")],
             environ={"LAB_NODES": "4", "LAB_SPEC__ETCD__TLS": "false"})
    assert (s.nodes.count, s.etcd.tls) == (2, True)


def test_cli_override_objects_beat_env_and_file(tmp_path):
    # What `lab ... --nodes 8 --provider virtualbox --name flag` builds.
    overrides = [Override(("nodes", "count"), 8, "--nodes 8"), Override(("provider",), "virtualbox",
                 "--provider virtualbox"), Override(("name",), "flag", "--name flag")]
    s = load(tmp_path, FILE, overrides, environ={"LAB_NODES": "4", "LAB_PROVIDER": "libvirt", "LAB_NAME": "env"})
    assert (s.nodes.count, s.provider, s.name) == (8, "virtualbox", "flag")


def test_later_flag_beats_earlier_flag(tmp_path):
    # The CLI passes --set first and --nodes after it: the dedicated flag wins.
    s = load(tmp_path, FILE, [parse_set_option("nodes.count=2"), Override(("nodes", "count"), 9, "--nodes 9")])
    assert s.nodes.count == 9


def test_override_keeps_sibling_keys_of_the_file(tmp_path):
    s = load(tmp_path, "etcd:\n  heartbeat_ms: 50\n  election_timeout_ms: 500\n", [parse_set_option("etcd.tls=true")])
    assert (s.etcd.heartbeat_ms, s.etcd.election_timeout_ms, s.etcd.tls) == (50, 500, True)


def test_override_into_a_section_the_file_leaves_empty(tmp_path):
    s = load(tmp_path, "network:\nnodes: {}\n", [parse_set_option("network.subnet=10.9.0.0/24"),
                                                  parse_set_option("nodes.cpus=2")])
    assert str(s.network.subnet) == "10.9.0.0/24" and s.nodes.cpus == 2


# ---------------------------------------------------------------- --set parsing


@pytest.mark.parametrize("text, path, value", [
    ("nodes.count=5", ("nodes", "count"), 5),
    ("etcd.tls=true", ("etcd", "tls"), True),
    ("etcd.tls=no", ("etcd", "tls"), False),
    ("name=demo", ("name",), "demo"),
    ("name=a=b", ("name",), "a=b"),
    ("nodes.metadata={role: db}", ("nodes", "metadata"), {"role": "db"}),
    ("forwarded_ports=[]", ("forwarded_ports",), []),
    ("box.version=", ("box", "version"), ""),
    (" nodes.count =3", ("nodes", "count"), 3),
    ("name=[unclosed", ("name",), "[unclosed"),  # not YAML: kept as text
])
def test_parse_set_option(text, path, value):
    override = parse_set_option(text)
    assert (override.path, override.value) == (path, value)
    assert override.origin == f"--set {text}"


@pytest.mark.parametrize("text", ["nodes.count", "=3", " =3", ""])
def test_parse_set_option_refuses_a_missing_key_or_value(text):
    with pytest.raises(SpecError) as info:
        parse_set_option(text)
    assert "KEY.PATH=VALUE" in info.value.message


def test_set_value_with_a_python_tag_is_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    override = parse_set_option(f"name=!!python/object/apply:os.system ['touch {tmp_path}/pwned']")
    assert isinstance(override.value, str)
    message = error_of(tmp_path, None, [override])
    assert message.startswith("--set name=")
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------- where an error came from


def test_file_error_names_file_line_and_key(tmp_path):
    message = error_of(tmp_path, "name: ok\nnodes:\n  count: 0\n")
    assert message.startswith(f"{tmp_path / 'lab.yaml'}:3: nodes.count: ")
    assert "at least 1" in message and "got 0" in message


def test_relative_path_is_named_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "nodes:\n  count: 0\n")
    with pytest.raises(SpecError) as info:
        load_spec("lab.yaml", environ={})
    assert info.value.message.startswith("lab.yaml:2: nodes.count")


@pytest.mark.parametrize("environ, overrides, origin", [
    ({"LAB_NODES": "0"}, [], "LAB_NODES"),
    ({"LAB_PROVIDER": "docker"}, [], "LAB_PROVIDER"),
    ({"LAB_NAME": "../../etc"}, [], "LAB_NAME"),
    ({"LAB_SUBNET": "8.8.8.0/24"}, [], "LAB_SUBNET"),
    ({"LAB_BOX_VERSION": "../x"}, [], "LAB_BOX_VERSION"),
    ({"LAB_SPEC__ETCD__TLS": "maybe"}, [], "LAB_SPEC__ETCD__TLS"),
    ({"LAB_SPEC__NODES__CUONT": "3"}, [], "LAB_SPEC__NODES__CUONT"),
    ({}, [parse_set_option("nodes.memory=12")], "--set nodes.memory=12"),
    ({}, [parse_set_option("updates.strategy=rolling")], "--set updates.strategy=rolling"),
    ({}, [Override(("nodes", "count"), 0, "--nodes 0")], "--nodes 0"),
    ({}, [Override(("provider",), "docker", "--provider docker")], "--provider docker"),
    ({"LAB_NODES": "0"}, [Override(("nodes", "count"), 201, "--nodes 201")], "--nodes 201"),
])
def test_error_from_env_or_flag_names_it_not_the_file(tmp_path, environ, overrides, origin):
    message = error_of(tmp_path, FILE, overrides, environ)
    assert message.startswith(f"{origin}: ")
    assert "lab.yaml" not in message


def test_override_of_a_non_section_names_the_flag(tmp_path):
    message = error_of(tmp_path, "nodes: 3\n", [parse_set_option("nodes.count=2")])
    assert message.startswith("--set nodes.count=2: nodes")
    assert "not a section" in message


def test_override_naming_no_key(tmp_path):
    message = error_of(tmp_path, None, environ={"LAB_SPEC__": "x"})
    assert message.startswith("LAB_SPEC__")


def test_cross_field_error_names_the_flag_that_caused_it(tmp_path):
    message = error_of(tmp_path, None, [parse_set_option("etcd.heartbeat_ms=300")])
    assert "etcd.election_timeout_ms" in message and "5x heartbeat_ms (1500)" in message
    assert "--set etcd.heartbeat_ms=300" in message


def test_cross_field_error_names_the_variable_that_caused_it(tmp_path):
    message = error_of(tmp_path, "forwarded_ports:\n  - {guest: 80, host: 8080, node: node-3}\n",
                       environ={"LAB_NODES": "1"})
    assert message.startswith(f"{tmp_path / 'lab.yaml'}:2: forwarded_ports[0].node")
    assert "LAB_NODES" in message and "nodes are node-1" in message


def test_every_problem_is_reported_with_its_line(tmp_path):
    message = error_of(tmp_path, "nodes:\n  count: 0\n  cpus: 0\nprovder: x\n")
    path = tmp_path / "lab.yaml"
    assert message.startswith(f"{path} has 3 problems:")
    assert f"{path}:2: nodes.count" in message
    assert f"{path}:3: nodes.cpus" in message
    assert f"{path}:4: provder: unknown key; did you mean 'provider'?" in message


def test_unknown_key_without_a_close_match_lists_valid_keys(tmp_path):
    message = error_of(tmp_path, "etcd:\n  xyzzy: 1\n")
    assert "etcd.xyzzy: unknown key (valid keys: heartbeat_ms, election_timeout_ms, tls, pre_vote, members)" in message


def test_unknown_key_under_a_list_suggests_by_alias(tmp_path):
    message = error_of(tmp_path, "nodes:\n  lst: []\n")
    assert "nodes.lst: unknown key; did you mean 'list'?" in message


def test_unknown_key_in_a_list_item(tmp_path):
    message = error_of(tmp_path, "forwarded_ports:\n  - {guest: 1, host: 2, prot: udp}\n")
    assert ":2: forwarded_ports[0].prot: unknown key" in message


@pytest.mark.parametrize("text, fragment", [
    ("nodes:\n  count: true\n", "nodes.count: must be a whole number, got True"),
    ("nodes:\n  count: 2.5\n", "nodes.count: must be a whole number"),
    ("nodes:\n  count: .inf\n", "nodes.count: must be a whole number"),
    ("nodes:\n  memory: yes\n", "nodes.memory: must be a whole number"),
    ("etcd:\n  tls: maybe\n", "etcd.tls: must be true or false, got 'maybe'"),
    ("nodes:\n  metadata: {gpus: 2}\n", "nodes.metadata.gpus: must be text, got a number"),
    ("nodes:\n  list:\n    - name: a\n      metadata: [x]\n", "nodes.list[0].metadata: must be a mapping"),
    ("nodes: {1: 2}\n", "keys must be text"),
    ("name: 2024-01-01\n", "name: must be text"),
    ("box:\n  version: 1.10\n", "box.version: must be text, got a number"),
    ("provider: virtualbx\n", "did you mean 'virtualbox'?"),
    ("network:\n  subnet: 10.77.3.1/24\n", "network.subnet: must be an IPv4 network"),
    ("network:\n  subnet: fd00::/64\n", "network.subnet: must be an IPv4 network"),
    ("network:\n  subnet: 100.64.0.0/24\n", "network.subnet: must be a private network"),
    ("network:\n  subnet: 10.0.0.0/27\n", "network.subnet: must be /26 or larger"),
    ("synced_folders:\n  - {host: '', guest: /src}\n", "synced_folders[0].host: must not be empty"),
    ("forwarded_ports:\n  - {host: 8080}\n", "forwarded_ports[0].guest: is required"),
])
def test_messages_say_what_was_expected(tmp_path, text, fragment):
    assert fragment in error_of(tmp_path, text)


def test_box_vagrant_takes_a_vagrant_box_name_and_refuses_anything_else(tmp_path):
    from lab.model.spec import LabSpec

    assert LabSpec.model_validate({"box": {"vagrant": "debian/bookworm64"}}).box.vagrant == "debian/bookworm64"
    assert LabSpec.model_validate({"box": {"vagrant": "my-box"}}).box.vagrant == "my-box"
    for bad in ("debian/bookworm64 --force", "a/b/c", "/abs", ""):
        with pytest.raises(ValueError):
            LabSpec.model_validate({"box": {"vagrant": bad}})


def test_box_version_given_as_a_whole_number_is_text(tmp_path):
    assert load(tmp_path, "box:\n  version: 2\n").box.version == "2"
    assert load(tmp_path, None, [parse_set_option("box.version=3")]).box.version == "3"


@pytest.mark.parametrize("text", ["- name: lab\n", "just text\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path, text):
    message = error_of(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'lab.yaml'}:1: the top level must be a mapping")


def test_yaml_errors_name_file_and_line(tmp_path):
    message = error_of(tmp_path, "name: ok\nnodes:\n  count: 1\n  count: 2\n")
    assert message.startswith(f"{tmp_path / 'lab.yaml'}:4: duplicate key 'nodes.count'")


def test_spec_path_that_is_a_directory(tmp_path):
    (tmp_path / "lab.yaml").mkdir()
    with pytest.raises(SpecError, match="is not a file"):
        load_spec(tmp_path / "lab.yaml", environ={})


def test_spec_that_is_not_utf8(tmp_path):
    (tmp_path / "lab.yaml").write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(SpecError, match="cannot be read"):
        load_spec(tmp_path / "lab.yaml", environ={})


# ---------------------------------------------------------------- names never escape

BAD_NAMES = ["../../etc", "..", ".", "a/b", "/abs", "Lab", "lab_1", "1lab", "-lab", "lab\n", "lab name",
             "a" * 25, "", "läb", "lab\x00", "~root", "$(touch x)"]


@pytest.mark.parametrize("name", BAD_NAMES)
@pytest.mark.parametrize("where", ["name", "prefix", "member", "port-node"])
def test_names_that_could_escape_or_break_a_path_are_refused(name, where):
    data = {"name": {"name": name}, "prefix": {"nodes": {"prefix": name}},
            "member": {"nodes": {"list": [{"name": name}]}},
            "port-node": {"nodes": {"list": [{"name": name}]}, "forwarded_ports": [{"guest": 1, "host": 2,
                                                                                    "node": name}]}}[where]
    with pytest.raises(ValidationError) as info:
        LabSpec.model_validate(data)
    assert "pattern" in str(info.value)


def test_longest_valid_name():
    assert LabSpec(name="a" + "-9" * 11 + "z").name == "a" + "-9" * 11 + "z"


def test_lab_directory_stays_inside_the_project(tmp_path):
    from lab.core.lab import LABS_DIR, Lab

    lab = Lab(load_spec(tmp_path / "lab.yaml", environ={"LAB_NAME": "deep-name-1"}))
    assert lab.lab_dir == (tmp_path / LABS_DIR / "deep-name-1").absolute()
    assert not (tmp_path / LABS_DIR).exists()  # opening a lab creates nothing


# ---------------------------------------------------------------- schema and the init template


def test_json_schema_names_every_key():
    schema = json_schema()
    json.dumps(schema)  # plain JSON
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False
    top = set(schema["properties"])
    assert top == {field.alias or name for name, field in LabSpec.model_fields.items()}
    assert {"name", "provider", "box", "nodes", "network", "etcd", "updates", "forwarded_ports",
            "synced_folders", "providers"} <= top
    nodes = schema["$defs"]["Nodes"]["properties"]
    assert "list" in nodes and "members" not in nodes
    assert schema["$defs"]["Nodes"]["additionalProperties"] is False
    assert schema["properties"]["provider"]["enum"] == list(PROVIDER_CHOICES)


def test_json_schema_validates_the_default_file_and_catches_mistakes():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json_schema()
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    validator = validator_cls(schema)
    from lab.model import yamlsafe

    data = yamlsafe.load(default_yaml()).data
    assert list(validator.iter_errors(data)) == []
    assert list(validator.iter_errors(LabSpec().model_dump(mode="json", by_alias=True))) == []
    assert not validator.is_valid({"nodes": {"count": 0}})
    assert not validator.is_valid({"nodes": {"cout": 3}})
    assert not validator.is_valid({"provider": "docker"})
    assert not validator.is_valid({"name": "../x"})


def test_default_yaml_loads_and_equals_the_defaults(tmp_path):
    loaded = load_spec(write(tmp_path, default_yaml()), environ={})
    assert loaded.spec == LabSpec()


def test_default_yaml_carries_its_arguments(tmp_path):
    s = load(tmp_path, default_yaml(name="demo", nodes=5, provider="nspawn"))
    assert (s.name, s.nodes.count, s.provider) == ("demo", 5, "nspawn")
    assert s.model_dump(exclude={"name", "nodes", "provider"}) == LabSpec().model_dump(
        exclude={"name", "nodes", "provider"})


def test_default_yaml_mentions_every_top_level_key():
    text = default_yaml()
    for key in json_schema()["properties"]:
        assert f"\n{key}:" in text or text.startswith(f"{key}:") or f"# {key}:" in text, key
