"""The `lab` command line, run in-process through typer's CliRunner.

Only verbs that need no nodes run here: help, init, spec, validation of
broken files, argument errors, and the lifecycle of `lab test` / `lab scenario
run`, the fault verbs and `lab destroy` on lab.testing's fake provider (with
the scenario run stubbed). Booting labs is tested on real nodes.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lab.model.spec import LabSpec, load_spec

pytestmark = pytest.mark.usefixtures("no_lab_env")

REPO = Path(__file__).resolve().parents[2]
BROKEN = Path(__file__).resolve().parent / "broken"


def assert_clean_failure(result, code: int = 2) -> None:
    """Failed the way a user mistake should: the exit code, a message, no traceback."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert result.output.strip()


def tree_of_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ---------------------------------------------------------------- help of every verb


def _command_paths():
    import typer.main

    from lab.cli import app

    def walk(command, path):
        yield path, command
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            yield from walk(sub, path + (name,))

    return list(walk(typer.main.get_command(app), ()))


COMMANDS = _command_paths()


def test_the_tree_has_the_documented_verbs():
    paths = {" ".join(path) for path, _ in COMMANDS}
    assert {"init", "up", "status", "exec", "destroy", "validate", "spec show", "spec schema",
            "box build", "fault kill", "scenario run"} <= paths


@pytest.mark.parametrize("path, command", COMMANDS, ids=[" ".join(p) or "lab" for p, _ in COMMANDS])
def test_help_of_every_verb_shows_its_docstring(run_lab, path, command):
    assert command.help and command.help.strip(), f"`lab {' '.join(path)}` has no docstring"
    result = run_lab(*path, "--help")
    assert result.exit_code == 0, result.output
    first_paragraph = command.help.strip().split("\n\n")[0].replace("\b", "")
    assert " ".join(first_paragraph.split()) in " ".join(result.stdout.split())
    assert "Usage: lab" in result.stdout


HEAVY = ("pydantic", "fabric", "paramiko", "vagrant", "jinja2", "invoke", "cryptography", "yaml")


def modules_loaded_by(argv: list[str]) -> list[str]:
    """Which of HEAVY a fresh interpreter has imported after `lab ARGV`."""
    script = (
        "import sys\n"
        f"sys.argv = ['lab', *{argv!r}]\n"
        "import lab.cli\n"
        "try:\n"
        "    lab.cli.main()\n"
        "except SystemExit as exc:\n"
        "    assert exc.code in (0, None), exc.code\n"
        f"print(' '.join(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(REPO / ".no-home")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()[-1].split()


def test_lab_help_imports_no_heavy_module():
    assert modules_loaded_by(["--help"]) == []


@pytest.mark.parametrize("argv", [["spec", "--help"], ["spec", "show", "--help"], ["up", "--help"],
                                  ["box", "build", "--help"], ["exec", "--help"]])
def test_verb_help_imports_no_heavy_module_of_lab(argv):
    # typer >= 0.2x coerces the parameters of any sub-command with pydantic,
    # so pydantic is typer's choice here, not lab's.
    assert [m for m in modules_loaded_by(argv) if m != "pydantic"] == []


# ---------------------------------------------------------------- lab init


def test_init_writes_a_valid_default_spec(run_lab, project):
    result = run_lab("init")
    assert result.exit_code == 0, result.output
    assert "wrote lab.yaml" in result.stdout
    loaded = load_spec(project / "lab.yaml", environ={})
    assert loaded.spec == LabSpec()
    assert tree_of_files(project) == ["lab.yaml"]  # no temp files left behind


def test_init_with_flags(run_lab, project):
    result = run_lab("init", "--name", "demo", "--nodes", "5", "--provider", "nspawn", "--file", "sub/lab.yaml")
    assert result.exit_code == 0, result.output
    spec = load_spec(project / "sub" / "lab.yaml", environ={}).spec
    assert (spec.name, spec.nodes.count, spec.provider) == ("demo", 5, "nspawn")


def test_init_refuses_to_overwrite_without_force(run_lab, project):
    (project / "lab.yaml").write_text("name: mine\n")
    result = run_lab("init")
    assert_clean_failure(result)
    assert "lab.yaml already exists" in result.stderr
    assert "--force" in result.stderr
    assert (project / "lab.yaml").read_text() == "name: mine\n"

    result = run_lab("init", "--force", "--nodes", "2")
    assert result.exit_code == 0, result.output
    assert load_spec(project / "lab.yaml", environ={}).spec.nodes.count == 2


@pytest.mark.parametrize("args, fragment", [
    (["--nodes", "0"], "nodes.count"),
    (["--nodes", "-1"], "nodes.count"),
    (["--name", "../../escape"], "name"),
    (["--name", "x: {y"], "--name"),
    (["--provider", "docker"], "provider"),
])
def test_init_never_writes_a_broken_spec(run_lab, project, args, fragment):
    result = run_lab("init", *args)
    assert_clean_failure(result)
    assert fragment in result.stderr
    assert tree_of_files(project.parent) == ["project"]


@pytest.mark.parametrize("args", [["--nodes", "-1"], ["--name", "../../escape"], ["--provider", "docker"]])
def test_init_error_names_the_flag(run_lab, project, args):
    result = run_lab("init", *args)
    assert_clean_failure(result)
    assert result.stderr.startswith(f"error: {args[0]} {args[1]}:")


# ---------------------------------------------------------------- lab spec


def test_spec_schema_prints_json_schema(run_lab, project):
    result = run_lab("spec", "schema")
    assert result.exit_code == 0, result.output
    schema = json.loads(result.stdout)
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert "nodes" in schema["properties"] and "list" in schema["$defs"]["Nodes"]["properties"]


def test_spec_show_combines_file_env_and_flags(run_lab, project):
    (project / "lab.yaml").write_text("name: demo\nnodes:\n  count: 2\n  memory: 2048\n")
    result = run_lab("spec", "show", "--nodes", "5", "--set", "etcd.tls=true",
                     env={"LAB_PROVIDER": "nspawn", "LAB_NODES": "4"})
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["name"] == "demo"
    assert shown["provider"] == "nspawn"
    assert shown["nodes"]["count"] == 5
    assert shown["nodes"]["memory"] == 2048
    assert shown["etcd"]["tls"] is True
    assert shown["etcd"]["heartbeat_ms"] == 100
    assert "list" in shown["nodes"]  # by its alias, as lab.yaml spells it


def test_spec_show_without_a_file_shows_defaults(run_lab, project):
    result = run_lab("spec", "show")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == LabSpec().model_dump(mode="json", by_alias=True)
    assert tree_of_files(project) == []


def test_file_option_from_lab_file_variable(run_lab, project):
    (project / "other.yaml").write_text("nodes:\n  count: 7\n")
    result = run_lab("spec", "show", env={"LAB_FILE": "other.yaml"})
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["nodes"]["count"] == 7


# ---------------------------------------------------------------- argument mistakes


@pytest.mark.parametrize("args, fragment", [
    (["spec", "show", "--bogus"], "--bogus"),
    (["spec", "show", "--nodes", "many"], "--nodes"),
    (["init", "--nodes", "x"], "--nodes"),
    (["frobnicate"], "frobnicate"),
    (["spec", "frobnicate"], "frobnicate"),
    (["spec", "show", "--set", "novalue"], "KEY.PATH=VALUE"),
    (["spec", "show", "--set", "nodes.count=0"], "--set nodes.count=0: nodes.count"),
    (["spec", "show", "--nodes", "0"], "--nodes 0: nodes.count"),
    (["spec", "show", "--provider", "docker"], "--provider docker: provider"),
    (["spec", "show", "--name", "Bad_Name"], "--name Bad_Name: name"),
    (["spec", "show", "--set", "etcd.heartbeat_ms=300"], "--set etcd.heartbeat_ms=300"),
    (["spec", "show", "--file", "missing-dir/"], "is not a file"),
    (["fault", "kill"], "Missing argument"),
])
def test_bad_arguments_exit_2_without_traceback(run_lab, project, args, fragment):
    if args[-1] == "missing-dir/":
        (project / "missing-dir").mkdir()
    result = run_lab(*args)
    assert_clean_failure(result)
    assert fragment in result.output


def test_bad_env_variable_is_named(run_lab, project):
    result = run_lab("spec", "show", env={"LAB_NODES": "lots"})
    assert_clean_failure(result)
    assert "LAB_NODES: nodes.count" in result.stderr


def test_exec_without_a_command_says_how(run_lab, project):
    result = run_lab("exec")
    assert_clean_failure(result)
    assert "no command given" in result.stderr
    assert "lab exec -- uptime" in result.stderr
    assert tree_of_files(project) == []


# ---------------------------------------------------------------- broken lab.yaml files

EXPECT = re.compile(r"# expect: (?P<fragment>.+?)(?:  line: (?P<line>\d+))?")
BROKEN_FILES = sorted(BROKEN.glob("*.yaml"))


def test_there_are_enough_broken_files():
    assert len(BROKEN_FILES) >= 25


# `validate` loads the spec before anything else, so a broken file must stop it
# the same way; `spec show` only loads the spec.
VERBS = [pytest.param(["spec", "show"], id="spec-show"), pytest.param(["validate"], id="validate")]


@pytest.mark.parametrize("verb", VERBS)
@pytest.mark.parametrize("source", BROKEN_FILES, ids=[p.stem for p in BROKEN_FILES])
def test_broken_file_is_refused_with_its_location(run_lab, tmp_path, monkeypatch, source, verb):
    match = EXPECT.fullmatch(source.read_text().splitlines()[0])
    assert match, f"{source.name}: the first line must be `# expect: KEY.PATH  line: N`"
    # A directory of its own, also the working directory: a payload that ran
    # or a lab directory that got created would show up in it.
    project = tmp_path / "project"
    project.mkdir()
    path = project / "lab.yaml"
    shutil.copyfile(source, path)
    monkeypatch.chdir(project)

    result = run_lab(*verb, "--file", str(path))

    assert_clean_failure(result)
    assert "error:" in result.stderr
    assert str(path) in result.stderr
    assert match["fragment"] in result.stderr
    if match["line"]:
        assert f"{path}:{match['line']}:" in result.stderr
    assert result.stdout == ""
    assert tree_of_files(tmp_path) == ["project", "project/lab.yaml"]


# ---------------------------------------------------------------- names cannot escape the project


@pytest.mark.parametrize("verb, how", [(["spec", "show"], "file"), (["spec", "show"], "env"),
                                       (["spec", "show"], "flag"), (["spec", "show"], "set"),
                                       (["status"], "file"), (["status"], "env"), (["status"], "flag")])
@pytest.mark.parametrize("name", ["../../escape", "../" * 40 + "tmp/escape", "/tmp/escape", "a/../../../escape",
                                  "..", "x" * 300])
def test_a_malicious_name_never_creates_anything(run_lab, tmp_path, monkeypatch, name, verb, how):
    project = tmp_path / "a" / "b" / "project"
    project.mkdir(parents=True)
    monkeypatch.chdir(project)
    path = project / "lab.yaml"
    path.write_text(f"name: {json.dumps(name)}\n" if how == "file" else "name: fine\n")
    extra = {"flag": ["--name", name], "set": ["--set", f"name={json.dumps(name)}"]}.get(how, [])
    env = {"LAB_NAME": name} if how == "env" else None

    result = run_lab(*verb, "--file", str(path), *extra, env=env)

    assert_clean_failure(result)
    assert "name: must be a lowercase name" in result.stderr
    assert tree_of_files(tmp_path) == ["a", "a/b", "a/b/project", "a/b/project/lab.yaml"]
    assert not Path("/tmp/escape").exists()


# ---------------------------------------------------------------- lab box


def test_box_build_refuses_an_unknown_format(run_lab, project):
    result = run_lab("box", "build", "--format", "ova")
    assert_clean_failure(result)
    assert "--format 'ova': unknown format" in result.stderr
    assert "container, libvirt, virtualbox" in result.stderr


def test_box_add_without_a_built_box_names_the_build_command(run_lab, project, tmp_path):
    result = run_lab("box", "add", "--format", "virtualbox", "--version", "2", "--no-build",
                     env={"XDG_CACHE_HOME": str(tmp_path / "empty-cache")})
    assert_clean_failure(result)
    assert "the virtualbox box of labos 2 is not built" in result.stderr
    assert "lab box build --format virtualbox --version 2" in result.stderr
    assert not (tmp_path / "empty-cache").exists() or not any((tmp_path / "empty-cache").rglob("*.box"))


# ---------------------------------------------------------------- the lifecycle of `lab test` / `lab scenario run`

FAKE = ["--provider", "nspawn"]


def lab_exists(project: Path, name: str = "lab") -> bool:
    return (project / ".lab" / name / "state.json").is_file()


def test_the_sequences_are_named_phases():
    from lab.core.lifecycle import PHASES, SEQUENCES

    assert SEQUENCES["test"] == ("check", "load", "images", "create", "verify", "destroy")
    assert SEQUENCES["scenario"] == ("load", "images", "create", "verify", "destroy")
    assert [name for name, phase in PHASES.items() if phase.always] == ["destroy"]


def test_lab_test_creates_a_lab_runs_and_destroys_it(run_lab, fake_lab, project):
    result = run_lab("test", "demo", *FAKE, "--junit", "out.xml")
    assert result.exit_code == 0, result.output
    assert "scenario demo passed: 5 ops, 0 not acknowledged" in result.stdout
    assert "removing the lab this run created" in result.stderr
    # the scenario's nodes: 2, as no --nodes was given
    assert fake_lab.calls == ["preflight", "up node-1", "up node-2", "destroy"]
    assert not lab_exists(project)
    assert (project / "out.xml").read_text() == "<testsuite/>\n"


def test_flags_win_over_the_scenarios_nodes(run_lab, fake_lab, project):
    result = run_lab("test", "demo", *FAKE, "--nodes", "1")
    assert result.exit_code == 0, result.output
    assert fake_lab.calls == ["preflight", "up node-1", "destroy"]


@pytest.mark.parametrize("policy, ok, kept", [("always", False, False), ("passing", True, False),
                                              ("passing", False, True), ("never", True, True)])
def test_lab_test_destroys_by_policy(run_lab, fake_lab, project, policy, ok, kept):
    fake_lab.outcome["ok"] = ok
    result = run_lab("test", "demo", *FAKE, "--destroy", policy)
    assert result.exit_code == (0 if ok else 1), result.output
    assert lab_exists(project) == kept
    if not ok:
        assert "scenario failed:\n  demo: step 1 failed" in result.stderr
        assert "scenario demo FAILED" in result.stdout


@pytest.mark.parametrize("error, code", [(KeyboardInterrupt(), 130), (RuntimeError("boom"), None)],
                         ids=["ctrl-c", "crash"])
def test_an_interrupted_run_still_destroys_the_lab_it_created(run_lab, fake_lab, project, error, code):
    fake_lab.outcome["raise"] = error
    result = run_lab("test", "demo", *FAKE)
    if code is None:
        assert result.exception is error
    else:
        assert_clean_failure(result, code)
        assert "interrupted" in result.stderr
    assert fake_lab.calls[-1] == "destroy"
    assert not lab_exists(project)


def test_lab_test_refuses_an_existing_lab_and_leaves_it(run_lab, fake_lab, project):
    assert run_lab("test", "demo", *FAKE, "--destroy", "never").exit_code == 0
    fake_lab.calls.clear()
    result = run_lab("test", "demo", *FAKE)
    assert_clean_failure(result)
    assert "lab 'lab' already exists; `lab test` creates its own" in result.stderr
    assert fake_lab.calls == []
    assert lab_exists(project)


def test_a_bad_destroy_policy_is_refused_before_anything(run_lab, fake_lab, project):
    result = run_lab("test", "demo", *FAKE, "--destroy", "sometimes")
    assert_clean_failure(result)
    assert "--destroy 'sometimes': must be always, never or passing" in result.stderr
    assert fake_lab.calls == [] and not (project / ".lab").exists()


def test_scenario_run_keeps_a_lab_it_did_not_create(run_lab, fake_lab, project):
    assert run_lab("test", "demo", *FAKE, "--destroy", "never").exit_code == 0
    fake_lab.calls.clear()
    fake_lab.outcome["ok"] = False
    result = run_lab("scenario", "run", "demo")
    assert result.exit_code == 1, result.output
    assert fake_lab.calls == []  # no `up` (nothing to change), no destroy
    assert lab_exists(project)


@pytest.mark.parametrize("keep", [False, True])
def test_scenario_run_removes_a_lab_it_created_unless_kept(run_lab, fake_lab, project, keep):
    result = run_lab("scenario", "run", "demo", *FAKE, *(["--keep"] if keep else []))
    assert result.exit_code == 0, result.output
    assert lab_exists(project) == keep


def test_an_unknown_scenario_creates_nothing(run_lab, fake_lab, project):
    result = run_lab("scenario", "run", "nope", *FAKE)
    assert_clean_failure(result)
    assert "no scenario named 'nope'" in result.stderr
    assert fake_lab.calls == [] and not (project / ".lab").exists()


def test_a_failing_clean_up_raises_its_own_error_chained_to_the_first():
    from lab.core.lifecycle import Phase, ScenarioRuns, run_sequence

    ran = []

    def fail(name):
        def run(_runs):
            ran.append(name)
            raise RuntimeError(name)
        return run

    runs = ScenarioRuns([], Path("lab.yaml"), None, "always", None, lambda _m: None)
    with pytest.raises(RuntimeError, match="clean-up") as caught:
        run_sequence([Phase("a", fail("first")), Phase("b", fail("skipped")), Phase("c", fail("clean-up"), always=True)],
                     runs)
    assert ran == ["first", "clean-up"]
    assert str(caught.value.__context__) == "first"


# ---------------------------------------------------------------- fault verbs and destroy, on the fake provider


def test_fault_verbs_call_the_provider_node_by_node(run_lab, fake_lab, project):
    assert run_lab("test", "demo", *FAKE, "--destroy", "never").exit_code == 0
    fake_lab.calls.clear()
    assert run_lab("fault", "kill", "node-1", "node-2").stdout == "kill: node-1\nkill: node-2\n"
    assert run_lab("fault", "start", "node-2").stdout == "start: node-2\n"
    assert run_lab("fault", "partition", "node-1").stdout == "partitioned: node-1 | node-2\n"
    assert run_lab("fault", "heal").stdout == "healed\n"
    assert fake_lab.calls == ["kill node-1", "kill node-2", "start node-2", "partition node-1|node-2", "heal"]


@pytest.mark.parametrize("args", [["fault", "pause", "node-1", "node-9"], ["fault", "partition", "node-1,node-9"]])
def test_an_unknown_node_fails_before_any_fault(run_lab, fake_lab, project, args):
    assert run_lab("test", "demo", *FAKE, "--destroy", "never").exit_code == 0
    fake_lab.calls.clear()
    result = run_lab(*args)
    assert_clean_failure(result)
    assert "no node named 'node-9' in lab 'lab'" in result.stderr
    assert fake_lab.calls == []


def test_destroy_works_from_the_recorded_state_when_lab_yaml_is_broken(run_lab, fake_lab, project):
    assert run_lab("test", "demo", *FAKE, "--destroy", "never").exit_code == 0
    (project / "lab.yaml").write_text("nodes: {count: many}\n")
    result = run_lab("destroy")
    assert result.exit_code == 0, result.output
    assert "destroying lab 'lab' from its recorded state" in result.stderr
    assert result.stdout == "lab lab destroyed\n"
    assert not lab_exists(project)
    assert run_lab("destroy").exit_code == 2  # nothing recorded now: the broken file is the error
