"""Vagrantfile rendering: golden files, Ruby quoting, strict templates.

Golden files live in tests/golden/Vagrantfile.<provider>; regenerate them with
`LAB_UPDATE_GOLDEN=1 python -m pytest tests/unit/test_render.py` and review the diff.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lab.errors import ProviderError
from lab.providers.base import LabContext
from lab.providers.vagrant.render import (VAGRANT_PROVIDERS, render_template, render_vagrantfile, ruby_str, vagrant_box_name,
                        write_vagrantfile)
from lab.model.spec import LabSpec
from lab.testing import contexts

GOLDEN_DIR = Path(__file__).parent / "golden"
REPO = Path(__file__).resolve().parents[2]

GOLDEN_SPEC = {
    "name": "golden",
    "box": {"name": "labos", "version": "2"},
    "nodes": {
        "cpus": 1,
        "memory": 1024,
        "list": [
            {"name": "etcd-a", "memory": 2048},
            {"name": "etcd-b", "cpus": 2},
            {"name": "etcd-c"},
        ],
    },
    "forwarded_ports": [
        {"guest": 2379, "host": 12379},
        {"guest": 5353, "host": 15353, "node": "etcd-c", "protocol": "udp"},
    ],
    "synced_folders": [
        {"host": "./src", "guest": "/src"},
        {"host": "/srv/shared", "guest": "/shared", "disabled": True},
    ],
    "providers": {
        "libvirt": {"driver": "qemu"},
        "virtualbox": {"linked_clone": False, "gui": False},
    },
}


def make_context(tmp_path: Path, data: dict, *, lab_id: str = "c0ffee", subnet: str = "10.77.3.0/24") -> LabContext:
    return contexts.make_context(tmp_path, data, lab_id=lab_id, subnet=subnet)


def define_blocks(text: str) -> dict[str, str]:
    """Node name -> the text of its `config.vm.define` block."""
    blocks = {}
    for match in re.finditer(r'^  config\.vm\.define "([^"]+)" do \|node\|\n(.*?)^  end\n', text, re.M | re.S):
        blocks[match.group(1)] = match.group(2)
    return blocks


def ruby_syntax_ok(text: str, tmp_path: Path) -> None:
    if shutil.which("ruby") is None:
        return
    path = tmp_path / "Vagrantfile.check.rb"
    path.write_text(text)
    result = subprocess.run(["ruby", "-c", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- golden files

@pytest.mark.parametrize("provider", VAGRANT_PROVIDERS)
def test_golden_vagrantfile(provider: str, tmp_path: Path) -> None:
    text = render_vagrantfile(make_context(tmp_path, GOLDEN_SPEC), provider)
    golden = GOLDEN_DIR / f"Vagrantfile.{provider}"
    if os.environ.get("LAB_UPDATE_GOLDEN") == "1":
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert golden.is_file(), f"{golden} is missing: run with LAB_UPDATE_GOLDEN=1"
    assert text == golden.read_text(), f"{golden} differs: review, then regenerate with LAB_UPDATE_GOLDEN=1"
    assert str(tmp_path) not in text
    ruby_syntax_ok(text, tmp_path)


def test_output_does_not_depend_on_where_the_project_lives(tmp_path: Path) -> None:
    one = render_vagrantfile(make_context(tmp_path / "a", GOLDEN_SPEC), "libvirt")
    two = render_vagrantfile(make_context(tmp_path / "b" / "deeper", GOLDEN_SPEC), "libvirt")
    assert one == two


@pytest.mark.parametrize("provider", VAGRANT_PROVIDERS)
def test_only_the_selected_provider_block_is_rendered(provider: str, tmp_path: Path) -> None:
    text = render_vagrantfile(make_context(tmp_path, GOLDEN_SPEC), provider)
    blocks = set(re.findall(r'\.vm\.provider "([a-z_]+)"', text))
    assert blocks == {provider}
    assert "VAGRANT_DEFAULT_PROVIDER" not in text


def test_no_provisioners_and_default_share_disabled(tmp_path: Path) -> None:
    text = render_vagrantfile(make_context(tmp_path, GOLDEN_SPEC), "virtualbox")
    assert ".vm.provision" not in text
    assert 'config.vm.synced_folder ".", "/vagrant", disabled: true' in text
    assert 'Vagrant.require_version ">= 2.2"' in text
    # No key swap by Vagrant: lab puts its own key in at adoption (see adoption.py).
    assert "config.ssh.insert_key = false" in text and "insert_key = true" not in text


def test_unknown_provider_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ProviderError, match="'nspawn' is not a Vagrant provider"):
        render_vagrantfile(make_context(tmp_path, GOLDEN_SPEC), "nspawn")


# ---------------------------------------------------------------- what the spec says ends up where it should

def test_forwarded_ports_go_to_their_node_with_auto_correct(tmp_path: Path) -> None:
    blocks = define_blocks(render_vagrantfile(make_context(tmp_path, GOLDEN_SPEC), "virtualbox"))
    assert list(blocks) == ["etcd-a", "etcd-b", "etcd-c"]
    # no node given: the first node
    assert ('node.vm.network "forwarded_port", guest: 2379, host: 12379, protocol: "tcp",\n'
            '      host_ip: "127.0.0.1", auto_correct: true') in blocks["etcd-a"]
    assert "forwarded_port" not in blocks["etcd-b"]
    assert 'guest: 5353, host: 15353, protocol: "udp"' in blocks["etcd-c"]
    assert "12379" not in blocks["etcd-c"]
    assert all(line.strip().endswith("auto_correct: true")
               for block in blocks.values() for line in block.splitlines() if "host_ip:" in line)


def test_synced_folders_are_relative_to_lab_yaml(tmp_path: Path) -> None:
    context = make_context(tmp_path, GOLDEN_SPEC)
    text = render_vagrantfile(context, "libvirt")
    # lab.yaml's directory is two levels above the lab dir, where Vagrant resolves relative paths
    assert 'config.vm.synced_folder "../../src", "/src", disabled: false' in text
    assert (context.lab_dir / "../../src").resolve() == (tmp_path / "project" / "src").resolve()
    assert 'config.vm.synced_folder "/srv/shared", "/shared", disabled: true' in text


def test_per_node_overrides(tmp_path: Path) -> None:
    blocks = define_blocks(render_vagrantfile(make_context(tmp_path, GOLDEN_SPEC), "libvirt"))
    assert "lv.memory = 2048" in blocks["etcd-a"] and "lv.cpus = 1" in blocks["etcd-a"]
    assert "lv.memory = 1024" in blocks["etcd-b"] and "lv.cpus = 2" in blocks["etcd-b"]
    assert "lv.memory = 1024" in blocks["etcd-c"] and "lv.cpus = 1" in blocks["etcd-c"]
    assert 'ip: "10.77.3.11"' in blocks["etcd-a"] and 'ip: "10.77.3.13"' in blocks["etcd-c"]
    assert "hostname" not in blocks["etcd-b"]  # set when lab adopts the machine


def test_private_network_netmask_follows_the_lab_subnet(tmp_path: Path) -> None:
    text = render_vagrantfile(make_context(tmp_path, GOLDEN_SPEC, subnet="10.78.0.0/16"), "virtualbox")
    assert 'node.vm.network "private_network", ip: "10.78.0.11", netmask: "255.255.0.0",' in text


def test_provider_options_from_the_spec(tmp_path: Path) -> None:
    text = render_vagrantfile(make_context(tmp_path, GOLDEN_SPEC), "libvirt")
    assert 'lv.driver = "qemu"' in text and 'lv.uri = "qemu:///system"' in text
    assert 'lv.default_prefix = "golden-c0ffee-"' in text
    vbox = render_vagrantfile(make_context(tmp_path, {**GOLDEN_SPEC, "providers": {
        "virtualbox": {"linked_clone": True, "gui": True}}}), "virtualbox")
    assert "vb.linked_clone = true" in vbox and "vb.gui = true" in vbox
    assert 'vb.name = "golden-c0ffee-etcd-a"' in vbox


def test_fifty_nodes(tmp_path: Path) -> None:
    text = render_vagrantfile(make_context(tmp_path, {"nodes": {"count": 50}}), "libvirt")
    blocks = define_blocks(text)
    assert list(blocks) == [f"node-{i}" for i in range(1, 51)]
    ips = re.findall(r'ip: "([0-9.]+)"', text)
    assert len(ips) == 50 and len(set(ips)) == 50 and ips[-1] == "10.77.3.60"
    ruby_syntax_ok(text, tmp_path)


def test_write_vagrantfile(tmp_path: Path) -> None:
    context = make_context(tmp_path, GOLDEN_SPEC)
    path = write_vagrantfile(context, "parallels")
    assert path == context.lab_dir / "Vagrantfile"
    assert path.read_text() == render_vagrantfile(context, "parallels")
    assert [p.name for p in context.lab_dir.iterdir()] == ["Vagrantfile"]  # no temp file left


def test_box_name_is_local_and_versioned() -> None:
    spec = LabSpec.model_validate({"box": {"name": "labos", "version": "1.2"}})
    # no "/": Vagrant would take owner/name for a Vagrant Cloud shorthand
    assert vagrant_box_name(spec) == "lab-labos-1.2"


# ---------------------------------------------------------------- Ruby quoting

NASTY = [
    "plain",
    'say "hi"',
    "back\\slash\\",
    "#{system('id')}",
    "#@ivar #$global #",
    "\\#{still not}",
    'end; system("id"); "',
    "new\nline\ttab\r",
    "bell\x07 del\x7f",
    "ünïcødé ✓",
    "",
]


@pytest.mark.parametrize("value", NASTY)
def test_ruby_str_cannot_interpolate(value: str) -> None:
    literal = ruby_str(value)
    assert literal.startswith('"') and literal.endswith('"')
    body = literal[1:-1]
    # every '#' and '"' in the body is escaped
    assert not re.search(r'(?<!\\)(?:\\\\)*#', body)
    assert not re.search(r'(?<!\\)(?:\\\\)*"', body)


@pytest.mark.skipif(shutil.which("ruby") is None, reason="ruby not installed")
def test_ruby_reads_back_exactly_the_value(tmp_path: Path) -> None:
    script = tmp_path / "values.rb"
    script.write_text("".join(f"STDOUT.write(({ruby_str(v)}).unpack('U*').join(',') + \"\\n\")\n" for v in NASTY),
                      encoding="utf-8")
    result = subprocess.run(["ruby", str(script)], capture_output=True, text=True, check=True)
    decoded = ["".join(chr(int(c)) for c in line.split(",") if c) for line in result.stdout.splitlines()]
    assert decoded == NASTY


def test_spec_values_cannot_inject_ruby(tmp_path: Path) -> None:
    data = {
        "synced_folders": [{"host": 'x", "/y"); system("touch pwned"); ("', "guest": "/#{`touch pwned`}"}],
    }
    context = make_context(tmp_path, data)
    # The spec refuses such a URI (and paths outside the project) since it checks transports; the
    # renderer must still quote whatever reaches it.
    context.spec.providers.libvirt.uri = 'qemu:///system"; system("touch pwned"); "'
    text = render_vagrantfile(context, "libvirt")
    assert r'"/\#{`touch pwned`}"' in text
    assert r'lv.uri = "qemu:///system\"; system(\"touch pwned\"); \""' in text
    ruby_syntax_ok(text, tmp_path)
    if shutil.which("ruby"):
        # Evaluate the file for real with a stub of Vagrant's DSL: nothing may run.
        stub = tmp_path / "stub.rb"
        stub.write_text(
            "class Any; def method_missing(*a) self end; def respond_to_missing?(*) true end end\n"
            "module Vagrant; def self.require_version(*) end;"
            " def self.configure(_) yield Any.new end end\n"
            f"load {ruby_str(tmp_path / 'Vagrantfile.check.rb')}\n")
        subprocess.run(["ruby", str(stub)], cwd=tmp_path, check=True, capture_output=True)
        assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------- strict templates

def test_undefined_variable_is_an_error() -> None:
    with pytest.raises(ProviderError) as caught:
        render_template("line one\n{{ box }}\n{{ nope }}\n", {"box": '"b"'})
    assert "Vagrantfile.j2:3: undefined variable: nope" in caught.value.message


def test_undefined_attribute_is_an_error() -> None:
    with pytest.raises(ProviderError, match="undefined variable: .*has no attribute 'missing'"):
        render_template("{% for node in nodes %}{{ node.missing }}{% endfor %}", {"nodes": [{"name": '"a"'}]})


def test_template_syntax_error_names_the_line() -> None:
    with pytest.raises(ProviderError, match=r"Vagrantfile.j2:2: "):
        render_template("ok\n{% if %}\n", {})


def test_template_settings() -> None:
    assert render_template("{{ x }}\n", {"x": "<&>"}) == "<&>\n"  # no autoescape, trailing newline kept
    assert render_template("{{ x | ruby_str }}", {"x": "#{1}"}) == '"\\#{1}"'


def test_importing_lab_does_not_load_jinja2_or_vagrant() -> None:
    code = ("import sys, lab.providers.vagrant.render, lab.providers.vagrant.provider, lab.providers.vagrant.libvirt, "
            "lab.providers.vagrant.virtualbox, lab.providers.vagrant.others, lab.host.vagrant; "
            "assert 'jinja2' not in sys.modules, 'jinja2'; assert 'vagrant' not in sys.modules, 'vagrant'")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO)
