"""Configuration from fastconsume.toml, pyproject.toml and FASTCONSUME_* variables, as ``fastconsume run``
and ``app.run()`` apply them (no broker; runs on the mock cluster)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fastconsume as fc
from fastconsume._config import CONFIG_FILE, Config, load_config
from fastconsume._options import OPTIONS
from fastconsume._reference import reference
from fastconsume._values import SECRET_WORDS, redact
from fastconsume.testing import produce

from kafka import MockKafka, new_group

ROOT = Path(__file__).resolve().parents[1]

FILE = """\
bootstrap = "file:9092"
group = "feeds"
topics = ["events"]
processes = 2
shutdown_timeout = "45s"

[kafka]
"fetch.wait.max.ms" = 100
"sasl.password" = "from-file"

[plugins.index]
batch_size = 100
"""


def load(tmp_path: Path, files: dict[str, str], environ: dict[str, str] | None = None) -> Config:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return load_config(cwd=tmp_path, environ=environ or {})


def config_error(tmp_path: Path, files: dict[str, str], environ: dict[str, str] | None = None) -> str:
    with pytest.raises(fc.ConfigError) as error:
        load(tmp_path, files, environ)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_fastconsume_toml_is_read(tmp_path: Path) -> None:
    config = load(tmp_path, {"fastconsume.toml": FILE})
    assert config == Config(
        app=None,
        settings={
            "bootstrap": "file:9092",
            "group": "feeds",
            "topics": ["events"],
            "shutdown_timeout": "45s",
            "kafka": {"fetch.wait.max.ms": "100", "sasl.password": "from-file"},
        },
        processes=2,
        plugins={"index": {"batch_size": 100}},
        source="fastconsume.toml",
        plugins_at="fastconsume.toml: plugins",
    )


def test_pyproject_tool_table_is_read(tmp_path: Path) -> None:
    pyproject = '[project]\nname = "feeds"\n\n[tool.fastconsume]\ngroup = "feeds"\n\n[tool.fastconsume.plugins.index]\n'
    config = load(tmp_path, {"pyproject.toml": pyproject})
    assert config.settings == {"group": "feeds"}
    assert config.plugins == {"index": {}}
    assert config.source == "pyproject.toml"
    assert config.plugins_at == "pyproject.toml: tool.fastconsume.plugins"


def test_pyproject_without_tool_table_is_not_a_config(tmp_path: Path) -> None:
    config = load(tmp_path, {"pyproject.toml": '[project]\nname = "feeds"\n'})
    assert config.settings == {}
    assert config.source == "defaults"


def test_fastconsume_toml_wins_over_pyproject(tmp_path: Path) -> None:
    config = load(
        tmp_path, {"fastconsume.toml": 'group = "from-toml"\n', "pyproject.toml": '[tool.fastconsume]\ngroup = "py"\n'}
    )
    assert config.settings == {"group": "from-toml"}
    assert config.source == "fastconsume.toml"


def test_explicit_path_is_read_relative_to_cwd(tmp_path: Path) -> None:
    (tmp_path / "fastconsume.toml").write_text('group = "ignored"\n')
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "prod.toml").write_text('group = "prod"\n')
    config = load_config("conf/prod.toml", cwd=tmp_path, environ={})
    assert config.settings == {"group": "prod"}
    assert config.source == "conf/prod.toml"
    assert load_config(tmp_path / "conf" / "prod.toml", environ={}).settings == {"group": "prod"}


def test_explicit_pyproject_uses_its_tool_table(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[tool.fastconsume]\ngroup = "py"\n')
    assert load_config("pyproject.toml", cwd=tmp_path, environ={}).settings == {"group": "py"}


@pytest.mark.parametrize(
    ("files", "path", "expected"),
    [
        ({}, "missing.toml", "missing.toml: no such config file"),
        ({"pyproject.toml": "[project]\n"}, "pyproject.toml", "pyproject.toml: has no [tool.fastconsume] table"),
        ({"bad.toml": "group = \n"}, "bad.toml", "bad.toml: invalid TOML: "),
    ],
)
def test_explicit_path_errors(tmp_path: Path, files: dict[str, str], path: str, expected: str) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(fc.ConfigError, match=re.escape(expected)) as error:
        load_config(path, cwd=tmp_path, environ={})
    assert "\n" not in str(error.value)


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "fastconsume.toml").write_bytes(b'group = "\xff"\n')
    with pytest.raises(fc.ConfigError, match=r"^fastconsume.toml: invalid TOML: not UTF-8"):
        load_config(cwd=tmp_path, environ={})


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    environ = {
        "FASTCONSUME_BOOTSTRAP": "env:9092",
        "FASTCONSUME_TOPICS": "events, audit,metrics",
        "FASTCONSUME_KAFKA_SASL_PASSWORD": "from-env",
        "FASTCONSUME_KAFKA_SESSION_TIMEOUT_MS": "6000",
        "FASTCONSUME_KAFKA_LOG__LEVEL": "7",
        "FASTCONSUME_WORKERS": "8",
        "FASTCONSUME_PROCESSES": "3",
        "FASTCONSUME_RATE_LIMIT": "2500.5",
        "FASTCONSUME_CONNECT_TIMEOUT": "5",
        "FASTCONSUME_SHUTDOWN_TIMEOUT": "1m",
        "FASTCONSUME_APP": "feeds.app:app",
        "PATH": "/usr/bin",  # not ours: ignored
    }
    config = load(tmp_path, {"fastconsume.toml": FILE}, environ)
    assert config.app == "feeds.app:app"
    assert config.processes == 3
    assert config.settings == {
        "bootstrap": "env:9092",
        "group": "feeds",
        "topics": ["events", "audit", "metrics"],
        "shutdown_timeout": "1m",
        "connect_timeout": 5,
        "workers": 8,
        "rate_limit": 2500.5,
        "kafka": {
            "fetch.wait.max.ms": "100",
            "sasl.password": "from-env",
            "session.timeout.ms": "6000",
            "log_level": "7",
        },
    }
    assert config.plugins == {"index": {"batch_size": 100}}
    assert config.source == "fastconsume.toml + environment"


def test_environment_alone(tmp_path: Path) -> None:
    config = load(tmp_path, {}, {"FASTCONSUME_GROUP": "feeds", "FASTCONSUME_KAFKA_SASL_USERNAME": "me"})
    assert config.settings == {"group": "feeds", "kafka": {"sasl.username": "me"}}
    assert config.source == "environment"


def test_no_config_at_all_is_empty_not_an_error(tmp_path: Path) -> None:
    assert load(tmp_path, {}) == Config(app=None, settings={}, processes=1, plugins={}, source="defaults")


def test_foreign_fastconsume_variables_are_ignored(tmp_path: Path) -> None:
    environ = {"FASTCONSUME_TEST_BOOTSTRAP": "x:1", "FASTCONSUME_TEST_SEED": "3", "FASTCONSUME_CACHE": "/tmp"}
    assert load(tmp_path, {}, environ).settings == {}


def test_kafka_values_become_strings_and_nested_tables_dotted_names(tmp_path: Path) -> None:
    text = (
        '[kafka]\n"enable.partition.eof" = true\n"check.crcs" = false\n"x.ratio" = 0.5\n[kafka.sasl]\nusername = "me"\n'
    )
    config = load(tmp_path, {"fastconsume.toml": text})
    assert config.settings["kafka"] == {
        "enable.partition.eof": "true",
        "check.crcs": "false",
        "x.ratio": "0.5",
        "sasl.username": "me",
    }


def test_rate_limit_table_becomes_a_rate_limit(tmp_path: Path) -> None:
    text = "rate_limit = { per_second = 5000, burst = 1000 }\n[plugins.index]\nrate_limit = 20.5\n"
    config = load(tmp_path, {"fastconsume.toml": text})
    assert config.settings["rate_limit"] == fc.RateLimit(per_second=5000, burst=1000)
    assert config.plugins["index"] == {"rate_limit": 20.5}


def test_plugin_options_are_kept_as_given(tmp_path: Path) -> None:
    text = """\
[plugins.index]
batch_size = 1000
linger = "50ms"
concurrency = 4
max_queued = 20000
max_queued_bytes = 1048576
timeout = 2.5
rate_limit = { per_second = 100 }
retries = 0
backoff = ["200ms", 60]
dlq = "events.dlq"
on_failure = "dead_letter"

[plugins.audit]
entry_point = "audit-log"
"""
    config = load(tmp_path, {"fastconsume.toml": text})
    assert config.plugins == {
        "index": {
            "batch_size": 1000,
            "linger": "50ms",
            "concurrency": 4,
            "max_queued": 20000,
            "max_queued_bytes": 1048576,
            "timeout": 2.5,
            "rate_limit": fc.RateLimit(100),
            "retries": 0,
            "backoff": ("200ms", 60),
            "dlq": "events.dlq",
            "on_failure": "dead_letter",
        },
        "audit": {"entry_point": "audit-log"},
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('topic = ["events"]\n', "fastconsume.toml: topic: unknown key; did you mean 'topics'?"),
        ("shutdown_timout = 1\n", "fastconsume.toml: shutdown_timout: unknown key; did you mean 'shutdown_timeout'?"),
        ("[plugins.index]\nbatchsize = 10\n", "fastconsume.toml: plugins.index.batchsize: unknown key; did you mean"),
        ("[plugins.index]\nzzz = 1\n", "fastconsume.toml: plugins.index.zzz: unknown key; expected one of: batch_size"),
        ("rate_limit = { per_secnd = 1 }\n", "fastconsume.toml: rate_limit.per_secnd: unknown key; did you mean"),
    ],
)
def test_unknown_keys_are_named_with_a_close_match(tmp_path: Path, text: str, expected: str) -> None:
    assert config_error(tmp_path, {"fastconsume.toml": text}).startswith(expected)


def test_unknown_key_in_pyproject_names_its_table(tmp_path: Path) -> None:
    message = config_error(tmp_path, {"pyproject.toml": "[tool.fastconsume]\ngrup = 'feeds'\n"})
    assert message == "pyproject.toml: tool.fastconsume.grup: unknown key; did you mean 'group'?"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "[plugins.index]\nbatch_size = 'ten'\n",
            "fastconsume.toml: plugins.index.batch_size: expected an integer, got 'ten'",
        ),
        ("[plugins.index]\nbatch_size = 0\n", "fastconsume.toml: plugins.index.batch_size: must be at least 1, got 0"),
        ("[plugins.index]\nretries = true\n", "fastconsume.toml: plugins.index.retries: expected an integer, got True"),
        (
            "[plugins.index]\nbackoff = ['1s']\n",
            "fastconsume.toml: plugins.index.backoff: expected a list of two durations",
        ),
        ("[plugins.index]\ndlq = ''\n", "fastconsume.toml: plugins.index.dlq: expected a non-empty string, got ''"),
        (
            "[plugins.index]\non_failure = 'skip'\n",
            "fastconsume.toml: plugins.index.on_failure: expected 'dead_letter' or",
        ),
        ("[plugins]\nindex = true\n", "fastconsume.toml: plugins.index: expected a table of plugin options"),
        ("plugins = ['index']\n", "fastconsume.toml: plugins: expected a table, got ['index']"),
        ("workers = 2.5\n", "fastconsume.toml: workers: expected an integer, got 2.5"),
        ("processes = 0\n", "fastconsume.toml: processes: must be at least 1, got 0"),
        ("group = 7\n", "fastconsume.toml: group: expected a non-empty string, got 7"),
        ("topics = 'events'\n", "fastconsume.toml: topics: expected a non-empty list of topic names, got 'events'"),
        ("topics = []\n", "fastconsume.toml: topics: expected a non-empty list of topic names, got []"),
        ("topics = ['a', 1]\n", "fastconsume.toml: topics: expected a non-empty list of topic names"),
        ("app = 'feeds'\n", 'fastconsume.toml: app: expected "MODULE:ATTR" or "path/to/file.py:ATTR", got \'feeds\''),
        ("rate_limit = -1\n", "fastconsume.toml: rate_limit: expected a positive number, got -1"),
        ("rate_limit = 'fast'\n", "fastconsume.toml: rate_limit: expected messages per second or a table"),
        ("rate_limit = { burst = 10 }\n", "fastconsume.toml: rate_limit: a rate_limit table needs per_second"),
        ("kafka = 'sasl.password=x'\n", "fastconsume.toml: kafka: expected a table, got a str"),
        (
            "[kafka]\n'sasl.password' = ['hunter2']\n",
            "fastconsume.toml: kafka.sasl.password: expected a string, number",
        ),
        (
            "[kafka]\n'sasl.username' = 'a'\n[kafka.sasl]\nusername = 'b'\n",
            "fastconsume.toml: kafka.sasl.username: given twice",
        ),
    ],
)
def test_wrong_types_name_the_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    assert config_error(tmp_path, {"fastconsume.toml": text}).startswith(expected)


def test_a_kafka_value_of_the_wrong_type_is_not_echoed(tmp_path: Path) -> None:
    message = config_error(tmp_path, {"fastconsume.toml": "[kafka]\n'sasl.password' = ['hunter2']\n"})
    assert "hunter2" not in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("shutdown_timeout = 'soon'\n", "fastconsume.toml: shutdown_timeout: 'soon' is not a duration"),
        ("connect_timeout = -1\n", "fastconsume.toml: connect_timeout: must be a finite, non-negative duration"),
        ("[plugins.index]\nlinger = '5 parsecs'\n", "fastconsume.toml: plugins.index.linger: '5 parsecs' is not a"),
        ("[plugins.index]\nbackoff = ['1s', 'later']\n", "fastconsume.toml: plugins.index.backoff[1]: 'later' is not"),
        ("[plugins.index]\ntimeout = true\n", "fastconsume.toml: plugins.index.timeout: expected seconds or a string"),
    ],
)
def test_bad_durations_name_the_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    assert config_error(tmp_path, {"fastconsume.toml": text}).startswith(expected)


@pytest.mark.parametrize(
    ("var", "expected"),
    [
        ("FASTCONSUME_TOPIC", "FASTCONSUME_TOPIC: unknown environment variable; did you mean FASTCONSUME_TOPICS?"),
        ("FASTCONSUME_BOOTSTRAP_SERVERS", "FASTCONSUME_BOOTSTRAP_SERVERS: unknown environment variable"),
        ("FASTCONSUME_PLUGINS", "FASTCONSUME_PLUGINS: unknown environment variable"),
        ("FASTCONSUME_KAFKA_", "FASTCONSUME_KAFKA_: not a librdkafka property name"),
        ("FASTCONSUME_KAFKA_SASL_", "FASTCONSUME_KAFKA_SASL_: not a librdkafka property name"),
    ],
)
def test_unknown_environment_variables_are_errors(tmp_path: Path, var: str, expected: str) -> None:
    assert config_error(tmp_path, {}, {var: "x"}).startswith(expected)


@pytest.mark.parametrize(
    ("var", "value", "expected"),
    [
        ("FASTCONSUME_WORKERS", "many", "FASTCONSUME_WORKERS: expected an integer, got 'many'"),
        ("FASTCONSUME_PROCESSES", "0", "FASTCONSUME_PROCESSES: must be at least 1, got 0"),
        ("FASTCONSUME_RATE_LIMIT", "fast", "FASTCONSUME_RATE_LIMIT: expected messages per second, got 'fast'"),
        ("FASTCONSUME_RATE_LIMIT", "nan", "FASTCONSUME_RATE_LIMIT: expected a positive number, got nan"),
        ("FASTCONSUME_REVOKE_TIMEOUT", "soon", "FASTCONSUME_REVOKE_TIMEOUT: 'soon' is not a duration"),
        ("FASTCONSUME_TOPICS", "a,,b", "FASTCONSUME_TOPICS: expected a non-empty list of topic names"),
        ("FASTCONSUME_GROUP", "", "FASTCONSUME_GROUP: expected a non-empty string, got ''"),
        ("FASTCONSUME_APP", "feeds", 'FASTCONSUME_APP: expected "MODULE:ATTR"'),
    ],
)
def test_bad_environment_values_name_the_variable(tmp_path: Path, var: str, value: str, expected: str) -> None:
    assert config_error(tmp_path, {}, {var: value}).startswith(expected)


SECRETS = [
    "sasl.password",
    "ssl.key.password",
    "ssl.keystore.password",
    "ssl.truststore.password",
    "ssl.key.pem",
    "ssl_key",
    "sasl.oauthbearer.config",
    "sasl.oauthbearer.client.secret",
    "sasl.oauthbearer.client.credentials.client.secret",
    "sasl.oauthbearer.assertion.private.key.passphrase",
    "sasl.oauthbearer.assertion.private.key.pem",
    "sasl.jaas.config",
    "SASL.PASSWORD",
]
NOT_SECRETS = {
    "sasl.username": "feeds",
    "sasl.mechanism": "PLAIN",
    "security.protocol": "sasl_ssl",
    "ssl.key.location": "/etc/kafka/client.key",
    "ssl.certificate.pem": "-----BEGIN CERTIFICATE-----",
    "ssl.ca.location": "/etc/ssl/ca.pem",
    "sasl.oauthbearer.client.id": "feeds",
    "fetch.wait.max.ms": 100,
    "enable.partition.eof": True,
}


def test_redact_hides_every_secret_and_keeps_the_rest() -> None:
    redacted = redact({**dict.fromkeys(SECRETS, "hunter2"), **NOT_SECRETS})
    assert {name: redacted[name] for name in SECRETS} == dict.fromkeys(SECRETS, "***")
    assert {name: redacted[name] for name in NOT_SECRETS} == {
        **{name: str(value) for name, value in NOT_SECRETS.items()},
        "fetch.wait.max.ms": "100",
        "enable.partition.eof": "true",
    }


def test_secret_words_are_lower_case_substrings() -> None:
    assert all(word == word.lower() for word in SECRET_WORDS)


def test_docs_configuration_md_is_the_reference() -> None:
    docs = ROOT / "docs" / "configuration.md"
    assert docs.read_text() == reference(), "regenerate: python -m fastconsume._reference > docs/configuration.md"


def test_module_prints_the_reference() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fastconsume._reference"], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout == reference()


def test_reference_documents_every_key_with_the_code_defaults() -> None:
    text = reference()
    for key in ("app", "bootstrap", "topics", "kafka", "processes", "revoke_timeout", "plugins", "entry_point"):
        assert f"| `{key}` |" in text
    assert f"| `batch_size` | integer ≥ 1 | `{OPTIONS['batch_size'].default}` |" in text
    assert f"`{OPTIONS['max_queued_bytes'].default}`" in text
    assert "`FASTCONSUME_KAFKA_<NAME>`" in text


def test_reference_example_is_a_valid_config(tmp_path: Path) -> None:
    (example,) = re.findall(r"```toml\n(.*?)```", reference(), flags=re.DOTALL)
    config = load(tmp_path, {"fastconsume.toml": example})
    assert config.app == "feeds.app:app"
    assert set(config.plugins) == {"index", "audit"}


APP_WITH_KAFKA = """
import fastconsume as fc

app = fc.App("127.0.0.1:9092", "feeds", "events", kafka={"client.id": "from-app", "sasl.username": "feeds"})

@app.plugin
def count(batch: fc.Batch) -> None: ...
"""


def test_the_environment_overrides_one_property_of_the_apps_kafka_and_keeps_the_rest(tmp_path: Path) -> None:
    (tmp_path / "kafka_app.py").write_text(APP_WITH_KAFKA)
    config = load_config(
        cwd=tmp_path,
        environ={"FASTCONSUME_APP": f"{tmp_path / 'kafka_app.py'}:app", "FASTCONSUME_KAFKA_SASL_PASSWORD": "hunter2"},
    )
    kafka = fc.App.from_config(config).describe()["kafka"]
    assert kafka == {"client.id": "from-app", "sasl.username": "feeds", "sasl.password": "***"}


def test_an_entry_point_on_a_plugin_of_the_app_is_refused(tmp_path: Path) -> None:
    (tmp_path / "kafka_app.py").write_text(APP_WITH_KAFKA)
    (tmp_path / CONFIG_FILE).write_text(
        f'app = "{tmp_path / "kafka_app.py"}:app"\n[plugins.count]\nentry_point = "x"\n'
    )
    with pytest.raises(fc.ConfigError, match=r"plugins\.count: names a plugin of the app"):
        fc.App.from_config(load_config(cwd=tmp_path, environ={}))


def test_validate_refuses_what_run_would() -> None:
    app = fc.App("127.0.0.1:9092", "feeds", "events", rate_limit=fc.RateLimit(100, burst=5))
    with pytest.raises(fc.ConfigError, match="register at least one plugin"):
        app.validate()
    app.plugin(lambda batch: None, name="small", batch_size=10, max_queued=10)
    with pytest.raises(fc.ConfigError, match="burst"):
        app.validate()
    app.plugin(lambda batch: None, name="large", batch_size=500)
    with pytest.raises(fc.ConfigError, match=r"'small': max_queued \(10\) must be at least the largest batch_size"):
        app.validate()


# --- bootstrap is checked at App(), in the file and in the environment. ---

GOOD_BOOTSTRAPS = [
    "127.0.0.1:9092",
    "broker-1:9092, broker-2:9093",
    "[::1]:9092",
    "SASL_SSL://kafka.example:9093",
    "x:1",
]
BAD_BOOTSTRAPS = {
    "garbage": "'garbage' has no port; expected host:port, like 'garbage:9092'",
    "broker:99999": "'broker:99999': the port must be a number from 1 to 65535, got '99999'",
    "broker:0": "'broker:0': the port must be a number from 1 to 65535, got '0'",
    "broker:": "'broker:': the port must be a number from 1 to 65535, got ''",
    "broker:http": "'broker:http': the port must be a number from 1 to 65535, got 'http'",
    "a:1,,b:2": "an empty entry in 'a:1,,b:2'",
    "a:1,": "an empty entry in 'a:1,'",
    ":9092": "':9092': '' is not a host name or address",
    "::1:9092": "'::1:9092': write an IPv6 address in brackets, like '[::1]:9092'",
    "bro ker:9092": "'bro ker:9092': 'bro ker' is not a host name or address",
    "": "expected host:port[,host:port...], got ''",
}


@pytest.mark.parametrize("bootstrap", GOOD_BOOTSTRAPS)
def test_good_bootstraps_are_accepted(bootstrap: str) -> None:
    assert fc.App(bootstrap, "g", "t").describe()["bootstrap"] == bootstrap


@pytest.mark.parametrize("bootstrap", sorted(BAD_BOOTSTRAPS))
def test_a_bad_bootstrap_is_refused_at_app_naming_the_entry(bootstrap: str) -> None:
    with pytest.raises(fc.ConfigError) as error:
        fc.App(bootstrap, "g", "t")
    assert str(error.value) == f"bootstrap: {BAD_BOOTSTRAPS[bootstrap]}"


def test_a_bad_bootstrap_in_the_file_or_the_environment_names_where(tmp_path: Path) -> None:
    message = config_error(tmp_path, {CONFIG_FILE: 'bootstrap = "garbage"\n'})
    assert message.startswith("fastconsume.toml: bootstrap: 'garbage' has no port"), message
    (tmp_path / "env").mkdir()
    message = config_error(tmp_path / "env", {}, {"FASTCONSUME_BOOTSTRAP": "broker:99999"})
    assert message.startswith("FASTCONSUME_BOOTSTRAP: 'broker:99999': the port must be"), message


# --- An unknown [plugins.NAME] names its file and the close names. ---

APP_WITH_COUNT_USERS = """
import fastconsume as fc

app = fc.App("127.0.0.1:9092", "feeds", "events")

@app.plugin
def count_users(batch: fc.Batch) -> None: ...

@app.plugin
def audit(batch: fc.Batch) -> None: ...
"""


def test_an_unknown_plugin_table_names_its_file_and_suggests_the_apps_plugin(tmp_path: Path) -> None:
    (tmp_path / "users.py").write_text(APP_WITH_COUNT_USERS)
    (tmp_path / CONFIG_FILE).write_text(f'app = "{tmp_path / "users.py"}:app"\n[plugins.count_userz]\nbatch_size = 5\n')
    with pytest.raises(fc.ConfigError) as error:
        fc.App.from_config(load_config(cwd=tmp_path, environ={}))
    assert str(error.value) == (
        "fastconsume.toml: plugins.count_userz: no plugin named 'count_userz': the app's plugins are "
        "count_users, audit, installed plugins none; did you mean 'count_users'?"
    )


def test_an_unknown_plugin_table_suggests_installed_plugins_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    installed = {name: object() for name in ("uppercase_count", "sink")}
    monkeypatch.setattr("fastconsume._app.installed_plugins", lambda: installed)
    (tmp_path / "users.py").write_text(APP_WITH_COUNT_USERS)
    (tmp_path / CONFIG_FILE).write_text(f'app = "{tmp_path / "users.py"}:app"\n[plugins.uppercase_cont]\n')
    with pytest.raises(fc.ConfigError) as error:
        fc.App.from_config(load_config(cwd=tmp_path, environ={}))
    assert str(error.value) == (
        "fastconsume.toml: plugins.uppercase_cont: no plugin named 'uppercase_cont': the app's plugins are "
        "count_users, audit, installed plugins sink, uppercase_count; did you mean 'uppercase_count'?"
    )


def test_an_unknown_plugin_table_in_pyproject_names_its_table(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(
        '[tool.fastconsume]\nbootstrap = "b:1"\ngroup = "g"\ntopics = ["t"]\n'
        "[tool.fastconsume.plugins.nothing_like_it]\n"
    )
    with pytest.raises(fc.ConfigError) as error:
        fc.App.from_config(load_config(cwd=tmp_path, environ={}))
    message = str(error.value)
    assert message.startswith("pyproject.toml: tool.fastconsume.plugins.nothing_like_it: no plugin named"), message
    assert "did you mean" not in message


# --- One configuration story: app.run() applies the file and FASTCONSUME_* itself. ---

RUN_APP = """
import fastconsume as fc

app = fc.App("127.0.0.1:1", "from-code", "no-such-topic", connect_timeout=2)
sizes = []

@app.plugin(batch_size=500)
def count(batch: fc.Batch) -> None:
    sizes.append(len(batch))

if __name__ == "__main__":
    app.run(idle_timeout=0.5)
    print("sizes", max(sizes), sum(sizes), app.describe()["group"], flush=True)
"""


def run_python_app(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    (tmp_path / "app.py").write_text(RUN_APP)
    clean = {name: value for name, value in os.environ.items() if not name.startswith("FASTCONSUME_")}
    return subprocess.run(
        [sys.executable, "app.py"],
        cwd=tmp_path,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_python_app_py_applies_the_file_then_the_environment_over_the_code(
    tmp_path: Path, mock_cluster: MockKafka
) -> None:
    """Case 6 of issue 9: ``python app.py`` ignored ``FASTCONSUME_*``. Now the code's
    unreachable bootstrap and missing topic are replaced from the file, whose group the
    environment replaces in turn, and the file's plugin option applies."""
    topic = mock_cluster.create_topic(1)
    produce(mock_cluster.bootstrap, topic, [b"x"] * 40, partition=0)
    env_group = new_group()
    (tmp_path / CONFIG_FILE).write_text(
        f'bootstrap = "{mock_cluster.bootstrap}"\ngroup = "from-file"\ntopics = ["{topic}"]\n'
        "[plugins.count]\nbatch_size = 7\n"
    )
    result = run_python_app(tmp_path, {"FASTCONSUME_GROUP": env_group})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["sizes", "7", "40", env_group]


def test_a_misspelled_variable_is_an_error_for_python_app_py_too(tmp_path: Path) -> None:
    started = time.monotonic()
    result = run_python_app(tmp_path, {"FASTCONSUME_GRUOP": "feeds"})
    assert result.returncode == 1, result.stderr
    assert (
        "fastconsume.errors.ConfigError: "
        "FASTCONSUME_GRUOP: unknown environment variable; did you mean FASTCONSUME_GROUP?" in result.stderr
    )
    assert time.monotonic() - started < 30, "refused before connecting"


def test_a_misspelled_variable_is_an_error_for_fastconsume_run(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(RUN_APP)
    clean = {name: value for name, value in os.environ.items() if not name.startswith("FASTCONSUME_")}
    result = subprocess.run(
        [sys.executable, "-m", "fastconsume", "run", "app:app"],
        cwd=tmp_path,
        env={**clean, "FASTCONSUME_GRUOP": "feeds"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert (
        result.stderr
        == "fastconsume: FASTCONSUME_GRUOP: unknown environment variable; did you mean FASTCONSUME_GROUP?\n"
    )


def test_run_applies_the_environment_once_and_read_config_false_ignores_it(
    tmp_path: Path, mock_cluster: MockKafka, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = mock_cluster.create_topic(1)
    produce(mock_cluster.bootstrap, topic, [b"x"] * 5, partition=0)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FASTCONSUME_BOOTSTRAP", mock_cluster.bootstrap)
    monkeypatch.setenv("FASTCONSUME_TOPICS", topic)
    app = fc.App("127.0.0.1:1", new_group(), "no-such-topic")
    app.plugin(len)
    app.run(idle_timeout=0.3)
    assert app.stats()["messages"] == 5
    assert app.describe()["bootstrap"] == mock_cluster.bootstrap

    monkeypatch.setenv("FASTCONSUME_GRUOP", "typo")
    with pytest.raises(fc.ConfigError, match="FASTCONSUME_GRUOP"):
        fc.App("127.0.0.1:1", new_group(), "t").run()
    ignoring = fc.App(mock_cluster.bootstrap, new_group(), topic, read_config=False)
    ignoring.plugin(len)
    ignoring.run(idle_timeout=0.3)  # neither the typo nor the other variables apply
    assert ignoring.stats()["messages"] == 5


def test_processes_in_the_file_is_not_applied_by_app_run_and_says_so(
    tmp_path: Path, mock_cluster: MockKafka, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    topic = mock_cluster.create_topic(1)
    monkeypatch.chdir(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(
        f'bootstrap = "{mock_cluster.bootstrap}"\ntopics = ["{topic}"]\nprocesses = 3\n'
    )
    app = fc.App("127.0.0.1:1", new_group(), "t")
    app.plugin(len)
    app.stop()
    with caplog.at_level(logging.INFO, logger="fastconsume"):
        app.run()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "processes = 3 (fastconsume.toml) is not applied: app.run() runs in this process only; "
        "`fastconsume run` starts several"
    ]


def test_a_stop_before_run_survives_the_configuration(
    tmp_path: Path, mock_cluster: MockKafka, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The configuration rebuilds the app's connection; a stop() asked before run() still
    makes that run return at once."""
    topic = mock_cluster.create_topic(1)
    produce(mock_cluster.bootstrap, topic, [b"x"] * 5, partition=0)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FASTCONSUME_BOOTSTRAP", mock_cluster.bootstrap)
    app = fc.App("127.0.0.1:1", new_group(), topic)
    app.plugin(len)
    app.stop()
    started = time.monotonic()
    app.run()  # without the stop, it would consume until a signal
    assert time.monotonic() - started < 15
    assert app.describe()["bootstrap"] == mock_cluster.bootstrap


def test_a_configuration_that_fails_is_not_taken_as_applied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mistake in the file fails every run, not only the first."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / CONFIG_FILE).write_text("[plugins.count_userz]\n")
    app = fc.App("127.0.0.1:9092", "g", "t")
    app.plugin(len, name="count_users")
    for _ in range(2):
        with pytest.raises(
            fc.ConfigError, match=r"fastconsume.toml: plugins.count_userz: .* did you mean 'count_users'"
        ):
            app.run()
    assert [p.name for p in app.plugins] == ["count_users"]
