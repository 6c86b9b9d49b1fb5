"""The first look's starting point: every node answers SSH and can run containers."""

import json


def test_node_answers_ssh_with_its_own_name(host):
    info = json.loads(host.file("/etc/lab/node.json").content_string)
    assert host.check_output("hostname") == info["node"]


def test_docker_client_is_installed(host):
    assert host.exists("docker")


def test_docker_waits_on_its_socket(host):
    # Socket-activated: an idle node pays nothing for Docker until the first command.
    assert host.service("docker.socket").is_enabled
    assert host.socket("unix:///run/docker.sock").is_listening


def test_docker_runs_an_init_in_every_container(host):
    # What makes the seed's unit stop in seconds: /bin/sh is not PID 1, so SIGTERM ends it.
    config = json.loads(host.file("/etc/docker/daemon.json").content_string)
    assert config.get("init") is True
