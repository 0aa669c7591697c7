"""The distribution's shape: one namespace over two folders, a light import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT


def run_python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/"
    )
    return done.stdout


def test_import_lrpilot_loads_no_heavy_dependency():
    """`import lrpilot` in a fresh interpreter must not pull torch, the
    frameworks the integrations are for, or the daemon's libraries."""
    out = run_python(
        "import json, sys, lrpilot, lrpilot.policies, lrpilot.integrations\n"
        "heavy = ['torch', 'prometheus_client', 'grafana_client', 'lrpilot.daemon',\n"
        "         'lightning', 'pytorch_lightning', 'transformers', 'accelerate']\n"
        "print(json.dumps([m for m in heavy if m in sys.modules]))"
    )
    assert json.loads(out) == []


def test_editable_install_maps_client_and_daemon_folders():
    """pyproject's package-dir maps client/ onto lrpilot and daemon/ onto lrpilot.daemon."""
    out = run_python(
        "import json, lrpilot, lrpilot.policies, lrpilot.daemon, lrpilot.daemon.cli.main\n"
        "print(json.dumps([lrpilot.__file__, lrpilot.policies.__file__,"
        " lrpilot.daemon.__file__]))"
    )
    client, policies, daemon = json.loads(out)
    assert client == str(ROOT / "client" / "__init__.py")
    assert policies == str(ROOT / "client" / "policies" / "__init__.py")
    assert daemon == str(ROOT / "daemon" / "__init__.py")


def test_bundled_example_stream_is_package_data():
    out = run_python(
        "from importlib import resources\n"
        "p = resources.files('lrpilot') / 'data' / 'example_metrics.jsonl'\n"
        "print(len(p.read_text().splitlines()))"
    )
    assert int(out) == 800


def test_console_script_answers_version_and_help(lrpilot_exe):
    import lrpilot

    version = subprocess.run([lrpilot_exe, "--version"], capture_output=True, text=True)
    assert version.returncode == 0
    assert version.stdout.strip() == f"lrpilot {lrpilot.__version__}"
    helped = subprocess.run([lrpilot_exe, "--help"], capture_output=True, text=True)
    assert helped.returncode == 0
    for command in ("simulate", "demo"):
        assert command in helped.stdout


def test_daemon_help_gives_each_flag_one_default_in_words(lrpilot_exe):
    """Not Python's "None", and not twice where the text says it itself."""
    helped = subprocess.run([lrpilot_exe, "daemon", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0
    assert "(default: None)" not in " ".join(helped.stdout.split())
    flags = [" ".join(f.split()) for f in helped.stdout.split("\n  --")]
    [shard_base] = [f for f in flags if f.startswith("shard-base-port SHARD_BASE_PORT ")]
    assert shard_base.count("(default:") == 1, shard_base
    [keys] = [f for f in flags if f.startswith("keys KEYS ")]
    assert keys.endswith("(default: none)"), keys


def test_no_command_is_a_one_line_usage_error(lrpilot_exe):
    done = subprocess.run([lrpilot_exe], capture_output=True, text=True)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1
    assert "COMMAND" in done.stderr


def test_the_dashboards_are_looked_for_where_pip_install_user_puts_them(tmp_path):
    """A wheel's data files land under the install scheme's prefix: with
    `pip install --user` that is the user base, which must be searched."""
    code = (
        "from lrpilot.daemon.observability.dashboards import dashboard_dirs; "
        "print(*dashboard_dirs(), sep='\\n')"
    )
    env = {**os.environ, "PYTHONUSERBASE": str(tmp_path / "user")}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    dirs = done.stdout.splitlines()
    assert str(tmp_path / "user" / "share" / "lrpilot" / "dashboards") in dirs
    assert str(Path(sys.prefix) / "share" / "lrpilot" / "dashboards") in dirs


def test_a_training_node_installs_the_hook_s_dependencies_only():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [req.split(">")[0].split("<")[0].split("=")[0] for req in project["dependencies"]]
    assert names == ["pyzmq", "pydantic"]
    daemon = project["optional-dependencies"]["daemon"]
    assert {req.split(">")[0] for req in daemon} == {"prometheus-client", "grafana-client", "rich"}


@pytest.mark.parametrize(
    ("argv", "missing", "extra"),
    [
        (["daemon", "--metrics-addr", "off"], "prometheus_client", "daemon"),
        (["top"], "rich", "daemon"),
    ],
)
def test_a_command_whose_extra_is_missing_says_which_to_install(tmp_path, argv, missing, extra):
    """Run the CLI with the daemon extra's modules made unimportable, as on
    a training node that installed lrpilot alone."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {('prometheus_client', 'grafana_client', 'rich')!r}:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from lrpilot.daemon.cli.main import main\n"
        f"sys.exit(main({argv!r}))\n"
    )
    env = {**os.environ, "LRPILOT_STATE_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert missing in lines[0] and f"pip install 'lrpilot[{extra}]'" in lines[0]
