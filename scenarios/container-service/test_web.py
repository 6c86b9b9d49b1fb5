"""After the faults and the roll: the containers the scheduler moved left nothing behind."""


def web_containers(host) -> list[str]:
    listed = host.check_output("docker ps -a --format '{{.Names}} {{.State}}'")
    return [line for line in listed.splitlines() if line.startswith("web-")]


def test_at_most_one_replica_per_node_and_no_stopped_one_left(host):
    found = web_containers(host)
    assert len(found) <= 1, found
    assert all(line.endswith(" running") for line in found), found


def test_a_node_running_a_replica_serves_it(host):
    if not web_containers(host):
        return
    body = host.check_output("python3 -c \"import urllib.request; "
                             "print(urllib.request.urlopen('http://127.0.0.1:8080/', timeout=5).read().decode())\"")
    assert body.startswith("web@") and body.endswith(f" on {host.check_output('hostname')}"), body
