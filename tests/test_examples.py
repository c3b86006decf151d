"""The examples under ``examples/``: they type-check with ``mypy --strict``; the example app
runs under ``fastconsume run`` with its settings overridden from the environment; the plugin
package, installed with pip, is listed by ``fastconsume plugins`` and runs when a
configuration names its plugins.

The example plugins write ``<topic> <partition> <offset>`` lines to
``example-out/<plugin>-<pid>.log`` under the working directory, which these tests read back.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kafka import RealCluster, fill, new_group

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_APP = f"{ROOT / 'examples' / 'app.py'}:app"
PLUGIN_PACKAGE = ROOT / "examples" / "plugins"
TYPED_EXAMPLES = ("examples/app.py", "examples/plugins/src")
"""What ``mypy --strict`` checks, relative to the repository (scripts/check runs the same)."""
PARTITIONS, PER_PARTITION = 3, 400


def run(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=240, check=False
    )


def environment(*, site: Path | None = None, **settings: str) -> dict[str, str]:
    """This process's environment without its ``FASTCONSUME_*`` variables, so that only the
    test's settings count, plus ``settings``; ``site`` goes first on ``PYTHONPATH``."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("FASTCONSUME_")}
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    return {**env, **settings}


def filled_topic(cluster: RealCluster) -> str:
    topic = cluster.create_topic(PARTITIONS)
    fill(cluster, topic, PARTITIONS, PER_PARTITION)
    return topic


def handled(out: Path, plugin: str, topic: str) -> list[tuple[int, int]]:
    """The (partition, offset) lines a plugin wrote, over all its files, sorted."""
    lines = [line.split() for path in sorted(out.glob(f"{plugin}-*.log")) for line in path.read_text().splitlines()]
    assert all(fields[0] == topic for fields in lines), f"{plugin} wrote lines of another topic"
    return sorted((int(fields[1]), int(fields[2])) for fields in lines)


EVERYTHING = sorted((p, i) for p in range(PARTITIONS) for i in range(PER_PARTITION))


def test_examples_pass_mypy_strict() -> None:
    result = run("-m", "mypy", "--strict", *TYPED_EXAMPLES)
    assert result.returncode == 0, f"mypy --strict {' '.join(TYPED_EXAMPLES)}:\n{result.stdout}{result.stderr}"


def test_the_example_app_runs_with_settings_from_the_environment(real_cluster: RealCluster, tmp_path: Path) -> None:
    """``FASTCONSUME_BOOTSTRAP``, ``_GROUP`` and ``_TOPICS`` replace the app's own settings;
    each of its three plugins (class, function, async) handles every message once."""
    topic = filled_topic(real_cluster)
    env = environment(
        FASTCONSUME_BOOTSTRAP=real_cluster.bootstrap, FASTCONSUME_GROUP=new_group(), FASTCONSUME_TOPICS=topic
    )

    result = run("-m", "fastconsume", "run", EXAMPLE_APP, "--idle-timeout", "1", cwd=tmp_path, env=env)

    assert result.returncode == 0, f"fastconsume run failed:\n{result.stdout}{result.stderr}"
    for plugin in ("audit", "word_count", "notify"):
        assert handled(tmp_path / "example-out", plugin, topic) == EVERYTHING, f"{plugin}: not every message once"


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory the example plugin package is pip-installed into (put it on PYTHONPATH)."""
    site = tmp_path_factory.mktemp("site")
    result = run(
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--no-build-isolation",  # flit_core comes from requirements-dev.txt: no download
        "--disable-pip-version-check",
        "--target",
        str(site),
        str(PLUGIN_PACKAGE),
    )
    assert result.returncode == 0, f"pip install examples/plugins failed:\n{result.stdout}{result.stderr}"
    return site


def test_installed_plugins_are_listed(plugin_site: Path, tmp_path: Path) -> None:
    result = run("-m", "fastconsume", "plugins", cwd=tmp_path, env=environment(site=plugin_site))
    assert result.returncode == 0, result.stderr
    listed = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    assert "uppercase_count" in listed, result.stdout
    assert "sink" in listed, result.stdout
    assert "fastconsume_example_plugins:Sink" in listed["sink"], result.stdout
    assert "fastconsume-example-plugins" in listed["sink"], f"the package is not named: {result.stdout}"


def test_installed_plugins_run_when_the_config_names_them(
    plugin_site: Path, real_cluster: RealCluster, tmp_path: Path
) -> None:
    """``[plugins.uppercase_count]`` (with an option) and ``[plugins.sink]`` (empty) load the
    entry points; ``fastconsume run`` drains the topic through both, ``sink``'s file opened
    in its ``setup`` included."""
    topic = filled_topic(real_cluster)
    config = tmp_path / "fastconsume.toml"
    config.write_text(
        f'bootstrap = "{real_cluster.bootstrap}"\n'
        f'group = "{new_group()}"\n'
        f'topics = ["{topic}"]\n'
        "\n[plugins.uppercase_count]\nbatch_size = 100\n"
        "\n[plugins.sink]\n"
    )
    env = environment(site=plugin_site)

    result = run("-m", "fastconsume", "run", "--config", str(config), "--idle-timeout", "1", cwd=tmp_path, env=env)

    assert result.returncode == 0, f"fastconsume run failed:\n{result.stdout}{result.stderr}"
    out = tmp_path / "example-out"
    for plugin in ("uppercase_count", "sink"):
        assert handled(out, plugin, topic) == EVERYTHING, f"{plugin}: not every message once"
    values = b"".join(path.read_bytes() for path in out.glob("sink-*.values")).splitlines()
    expected = [f"p{p}-{i}".encode() for p in range(PARTITIONS) for i in range(PER_PARTITION)]
    assert sorted(values) == sorted(expected), "the values sink wrote to the file it opened in setup()"
