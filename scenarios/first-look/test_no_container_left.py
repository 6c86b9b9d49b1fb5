"""After the first look: hello.service is stopped and no container runs on any node."""


def test_no_container_is_running(host):
    assert host.check_output("docker ps --quiet") == ""


def test_hello_service_is_not_running(host):
    assert not host.service("hello.service").is_running
