"""Mistakes a user can make get a clear exception, never a hang or a crash."""

from __future__ import annotations

import re
import socket
import time

import pytest

import fastconsume as fc

from kafka import Cluster, committed, fill, new_group


def test_unknown_librdkafka_property_is_a_value_error_naming_it() -> None:
    with pytest.raises(ValueError, match=r"no\.such\.property"):
        fc.App("127.0.0.1:9092", "g", ["t"], kafka={"no.such.property": 1})


def test_invalid_librdkafka_value_is_a_value_error_naming_the_property() -> None:
    with pytest.raises(fc.ConfigError, match=r"fetch\.wait\.max\.ms"):
        fc.App("127.0.0.1:9092", "g", ["t"], kafka={"fetch.wait.max.ms": "soon"})


def test_properties_fastconsume_owns_are_refused() -> None:
    with pytest.raises(ValueError, match=r"enable\.auto\.offset\.store"):
        fc.App("127.0.0.1:9092", "g", ["t"], kafka={"enable.auto.offset.store": True})


@pytest.mark.parametrize("topics", [[], [""]])
def test_empty_topics_are_refused(topics: list[str]) -> None:
    with pytest.raises(fc.ConfigError, match="topic"):
        fc.App("127.0.0.1:9092", "g", topics)


def test_empty_group_is_refused() -> None:
    with pytest.raises(fc.ConfigError, match="group"):
        fc.App("127.0.0.1:9092", "", ["t"])


def test_a_plugin_that_is_not_callable_is_a_type_error() -> None:
    app = fc.App("127.0.0.1:9092", "g", ["t"])
    with pytest.raises(TypeError, match="callable"):
        app.plugin(42)  # type: ignore[call-overload]


def test_a_plugin_that_takes_no_batch_is_a_type_error() -> None:
    app = fc.App("127.0.0.1:9092", "g", ["t"])
    with pytest.raises(TypeError, match="one positional argument"):

        @app.plugin
        def no_batch() -> None: ...


@pytest.mark.parametrize(("options", "match"), [({"batch_size": 0}, "batch_size"), ({"linger": "soon"}, "linger")])
def test_bad_plugin_options_are_config_errors(options: dict[str, object], match: str) -> None:
    app = fc.App("127.0.0.1:9092", "g", ["t"])
    with pytest.raises(fc.ConfigError, match=match):
        app.plugin(**options)(lambda batch: None)  # type: ignore[call-overload]


def test_duplicate_plugin_names_are_refused() -> None:
    app = fc.App("127.0.0.1:9092", "g", ["t"])
    app.plugin(lambda batch: None, name="same")
    with pytest.raises(fc.ConfigError, match="same"):
        app.plugin(lambda batch: None, name="same")


def test_run_without_plugins_is_refused() -> None:
    with pytest.raises(fc.ConfigError, match="plugin"):
        fc.App("127.0.0.1:9092", "g", ["t"]).run()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_broker_is_a_connection_error_after_the_connect_timeout() -> None:
    app = fc.App(f"127.0.0.1:{_closed_port()}", "g", ["t"], connect_timeout="1s")
    app.plugin(lambda batch: None, name="noop")
    started = time.monotonic()
    with pytest.raises(ConnectionError, match="could not reach Kafka") as raised:
        app.run()
    assert isinstance(raised.value, fc.KafkaConnectionError)
    assert "(last error: " in str(raised.value), "librdkafka's reason is named"
    assert "Connection refused" in str(raised.value), str(raised.value)
    assert "brokers are down" not in str(raised.value), "the cause, not the symptom"
    assert 0.5 < time.monotonic() - started < 10


class Boom(RuntimeError):
    pass


def test_a_plugin_that_raises_stops_the_run_and_its_batch_is_delivered_again(cluster: Cluster) -> None:
    topic = cluster.create_topic(1)
    fill(cluster, topic, 1, 1_000)
    group = new_group()
    app = fc.App(cluster.bootstrap, group, [topic])
    healthy: list[int] = []

    @app.plugin(batch_size=100)
    def fine(batch: fc.Batch) -> None:
        healthy.extend(m.offset for m in batch)

    @app.plugin(batch_size=100)
    def fragile(batch: fc.Batch) -> None:
        if any(m.offset == 450 for m in batch):
            raise Boom("offset 450 is cursed")

    with pytest.raises(fc.PluginError, match="fragile") as raised:
        app.run()
    assert isinstance(raised.value.__cause__, Boom)
    span = re.search(rf"{topic}\[0\] offsets (\d+)\.\.=(\d+)", str(raised.value))
    assert span is not None, str(raised.value)
    first, last = int(span.group(1)), int(span.group(2))
    assert first <= 450 <= last
    stored = committed(cluster.bootstrap, group, topic, 1)[0]
    assert stored <= first, "the failed batch must not be committed"

    again = fc.App(cluster.bootstrap, group, [topic])
    redelivered: list[int] = []
    again.plugin(name="again")(lambda batch: redelivered.extend(m.offset for m in batch))
    again.run(idle_timeout=2.0)
    assert 450 in redelivered
    assert redelivered == list(range(max(stored, 0), 1_000))
