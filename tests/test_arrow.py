"""The Arrow export of a batch (``batch.arrow_values()``, ``batch.arrow_keys()``): pyarrow and
polars read exactly the call's messages, without a copy, and an export holds the batch's
memory until the last reader lets go of it."""

from __future__ import annotations

import gc
from collections import defaultdict

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from confluent_kafka import Producer

import fastconsume as fc
from fastconsume import _core
from fastconsume.testing import produce, run_plugin

from kafka import Cluster, new_group

# Null, empty and ordinary values and keys, every kind next to every other; 53 messages, so
# that slices of 7 end mid-batch and the bitmap's bytes are crossed at odd places.
VALUES: list[bytes | None] = [[b"v%d" % n, None, b"", b"x" * (n % 13)][n % 4] for n in range(53)]
KEYS: list[bytes | None] = [None if n % 3 == 0 else b"k%d" % n for n in range(53)]


def produce_values_and_keys(bootstrap: str, topic: str) -> None:
    producer = Producer({"bootstrap.servers": bootstrap})
    for value, key in zip(VALUES, KEYS, strict=True):
        producer.produce(topic, value=value, key=key, partition=0)
    assert producer.flush(30) == 0


def data_address(array: pa.Array) -> int:
    """Where the array's bytes are: its data buffer (validity, offsets, data)."""
    buffer = array.buffers()[2]
    assert buffer is not None
    return int(buffer.address)


def test_pyarrow_and_polars_read_exactly_the_calls_messages(cluster: Cluster) -> None:
    topic = cluster.create_topic(1)
    produce_values_and_keys(cluster.bootstrap, topic)
    app = fc.App(cluster.bootstrap, new_group(), [topic])
    seen: dict[str, list[bytes | None]] = defaultdict(list)
    slice_starts: list[int] = []

    def check(batch: fc.Batch, plugin: str) -> pa.Array:
        values, keys = batch.arrow_values(), batch.arrow_keys()
        assert len(values) == len(keys) == len(batch)
        array = pa.array(values)
        assert array.type == pa.large_binary()
        assert array.to_pylist() == batch.values()
        assert pa.array(keys).to_pylist() == [m.key for m in batch]
        assert array.null_count == batch.values().count(None)
        assert pl.Series(values).to_list() == batch.values()
        assert pl.from_arrow(keys).to_list() == [m.key for m in batch]
        seen[plugin].extend(array.to_pylist())
        return array

    @app.plugin(batch_size=53)
    def whole(batch: fc.Batch) -> None:
        check(batch, "whole")

    # Fetched batches are as large as the largest batch_size: this plugin gets slices of them.
    @app.plugin(batch_size=7)
    def sliced(batch: fc.Batch) -> None:
        slice_starts.append(check(batch, "sliced").offset)

    app.run(idle_timeout=1.5)
    assert seen == {"whole": VALUES, "sliced": VALUES}
    assert any(start > 0 for start in slice_starts), f"no call was a slice of a fetched batch: {slice_starts}"


def test_the_export_is_zero_copy(mock_cluster: Cluster) -> None:
    """Every export of a fetched batch, by any plugin and of any slice, points at the same
    bytes: the batch's own."""
    topic = mock_cluster.create_topic(1)
    produce_values_and_keys(mock_cluster.bootstrap, topic)
    app = fc.App(mock_cluster.bootstrap, new_group(), [topic])
    whole_at: dict[int, int] = {}  # by first offset of the call
    sliced_at: dict[int, int] = {}

    @app.plugin(batch_size=53)
    def whole(batch: fc.Batch) -> None:
        first, second = pa.array(batch.arrow_values()), pa.array(batch.arrow_values())
        assert data_address(first) == data_address(second)
        assert first.buffers()[1].address == second.buffers()[1].address  # the offsets too
        for message in batch:
            whole_at[message.offset] = data_address(first)

    @app.plugin(batch_size=7)
    def sliced(batch: fc.Batch) -> None:
        sliced_at[batch[0].offset] = data_address(pa.array(batch.arrow_values()))

    app.run(idle_timeout=1.5)
    assert len(whole_at) == len(VALUES)
    assert len(sliced_at) >= len(VALUES) // 7
    for offset, address in sliced_at.items():
        assert address == whole_at[offset], f"the slice from offset {offset} was copied"


def test_arrays_outlive_the_call_and_the_run(mock_cluster: Cluster) -> None:
    topic = mock_cluster.create_topic(2)
    values = {p: [f"p{p}-{n:05d}-".encode() * 4 for n in range(1500)] for p in range(2)}
    for p in range(2):
        produce(mock_cluster.bootstrap, topic, values[p], partition=p)
    before = _core._live_arrow_exports()
    app = fc.App(mock_cluster.bootstrap, new_group(), [topic])
    kept: dict[int, list[pa.Array]] = defaultdict(list)
    kept_polars: list[pl.Series] = []

    @app.plugin(batch_size=100)
    def keep(batch: fc.Batch) -> None:
        kept[batch.partition].append(pa.array(batch.arrow_values()))
        kept_polars.append(pl.Series(batch.arrow_values()))

    app.run(idle_timeout=1.0)
    # The engine has dropped every batch; churn the allocator before reading the arrays.
    again = fc.App(mock_cluster.bootstrap, new_group(), [topic])
    again.add_plugin(lambda batch: batch.values(), name="churn")
    again.run(idle_timeout=1.0)
    gc.collect()
    assert _core._live_arrow_exports() > before
    for p in range(2):
        assert [v for array in kept[p] for v in array.to_pylist()] == values[p]
    assert sorted(v for series in kept_polars for v in series.to_list()) == sorted(values[0] + values[1])
    assert sum(pc.sum(pc.binary_length(array)).as_py() for arrays in kept.values() for array in arrays) == sum(
        len(v) for p in range(2) for v in values[p]
    )
    kept.clear()
    kept_polars.clear()
    gc.collect()
    assert _core._live_arrow_exports() == before, "an export still holds its batch"


def test_a_capsule_dropped_unconsumed_releases_its_batch() -> None:
    def export_and_drop(batch: fc.Batch) -> list[int]:
        column = batch.arrow_values()
        live = [_core._live_arrow_exports()]
        schema, array = column.__arrow_c_array__()
        live.append(_core._live_arrow_exports())
        del schema, array  # never consumed: the capsule's destructor releases it
        live.append(_core._live_arrow_exports())
        column.__arrow_c_schema__()  # a schema alone holds nothing
        live.append(_core._live_arrow_exports())
        return live

    run = run_plugin(export_and_drop, [b"a", b"b"])
    [live] = run.results
    assert live == [live[0], live[0] + 1, live[0], live[0]]


def test_a_consumed_capsule_is_released_once_by_its_reader() -> None:
    def consume_twice(batch: fc.Batch) -> list[object]:
        column = batch.arrow_keys()
        start = _core._live_arrow_exports()
        schema, capsule = column.__arrow_c_array__()
        array = pa.Array._import_from_c_capsule(schema, capsule)
        with pytest.raises(pa.ArrowInvalid, match="released"):  # moved out: it cannot be read twice
            pa.Array._import_from_c_capsule(schema, capsule)
        del schema, capsule  # the capsules go; the array, which owns the export now, stays
        held = _core._live_arrow_exports() - start
        keys = array.to_pylist()
        del array
        return [held, _core._live_arrow_exports() - start, keys]

    run = run_plugin(consume_twice, [("k1", "a"), ("k2", "b")])
    assert run.results == [[1, 0, [b"k1", b"k2"]]]


def test_a_retry_of_some_messages_exports_just_those() -> None:
    def fail_some(batch: fc.Batch) -> tuple[list[bytes | None], list[bytes | None]]:
        if batch.attempt == 1:
            raise fc.PartialFailure([1, 3, 4], ValueError("retry these"))
        return pa.array(batch.arrow_values()).to_pylist(), pl.from_arrow(batch.arrow_keys()).to_list()

    messages = [("k0", "a"), ("k1", "bb"), ("k2", "c"), ("k3", ""), ("k4", "eeee")]
    run = run_plugin(fail_some, messages, batch_size=10, backoff=("10ms", "10ms"))
    assert run.results == [([b"bb", b"", b"eeee"], [b"k1", b"k3", b"k4"])]


def test_the_column_describes_itself() -> None:
    def describe(batch: fc.Batch) -> tuple[str, str, str, object, int]:
        column = batch.arrow_values()
        field = pa.field(column)  # from __arrow_c_schema__
        return column.name, batch.arrow_keys().name, repr(column), (field.name, field.type, field.nullable), len(column)

    run = run_plugin(describe, [b"a", b"", b"c"])
    assert run.results == [
        (
            "values",
            "keys",
            "ArrowColumn(values, 3 entries, 0 null, large_binary)",
            ("values", pa.large_binary(), True),
            3,
        )
    ]
