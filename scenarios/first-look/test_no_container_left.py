"""After the first look: hello.service is stopped and none of its containers runs on any node.

Only the seed's containers (image ubuntu) are counted: a container another
scenario runs on the same lab is not the first look's to judge.
"""


def test_no_container_of_the_seed_is_running(host):
    assert host.check_output("docker ps --quiet --filter ancestor=ubuntu") == ""


def test_hello_service_is_not_running(host):
    assert not host.service("hello.service").is_running
