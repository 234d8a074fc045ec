"""How values are stored (``store.dumps``/``loads``, msgspec's JSON codec with the json module behind it):
what the json module wrote before still reads the same, and the rules for what a node may return are the
json module's, in both runtimes."""

from __future__ import annotations

import json
import math

import pytest

from flowcraft_cli.errors import UndecodableValue
from flowcraft_cli.store import check_json, dumps, loads

BIG = 2**70 + 1


@pytest.mark.parametrize("value", [
    None, True, 0, -1, BIG, -BIG, 2**64, 0.1, 1e16, -2.5e-300, "", "é ✓ 𝄞", "a\"b\\c\n",
    [1, [2, [3]]], {"k": {"n": None}}, {"1": 1, "b": [True, False]},
])
def test_a_value_reads_back_as_written_and_as_the_json_module_reads_it(value):
    raw = dumps(value)
    assert loads(raw) == value == json.loads(raw)
    assert loads(raw.encode()) == value
    assert type(loads(raw)) is type(value)


def test_keys_the_json_module_turns_into_strings_still_are():
    assert json.loads(dumps({1: "a", None: "c", 1.5: "d"})) == {"1": "a", "null": "c", "1.5": "d"}
    assert dumps({True: "b"}) == '{"true":"b"}' == json.dumps({True: "b"}, separators=(",", ":"))


def test_nan_is_stored_as_null_and_nan_written_before_still_reads():
    assert dumps([math.nan, math.inf, -math.inf]) == "[null,null,null]"
    assert math.isnan(loads("NaN")) and loads(b"[Infinity]") == [math.inf]


def test_what_is_not_json_is_refused_by_the_check_and_undecodable_on_read():
    import datetime

    for bad in (datetime.date.today(), {1, 2}, b"x", object()):
        with pytest.raises((TypeError, ValueError)):
            check_json(bad)
    for raw in (b"\xff\xfe", "{", b"[1,", "nul"):
        with pytest.raises(UndecodableValue):
            loads(raw)
        assert loads(raw, lenient=True).startswith("<undecodable:")


def test_a_node_output_round_trips_exactly_in_both_runtimes(flow):
    doc = """
id: codec
nodes: [{id: a, uses: a}, {id: b, uses: b}]
edges: [{source: a, target: b}]
"""

    def a(ctx):
        return {"big": BIG, "nan": math.nan, "text": "𝄞", "nested": [0.1, {"x": -BIG}]}

    def b(ctx):
        return ctx.input

    r = flow.run(doc, {"a": a, "b": b})
    assert r.status == "completed"
    expected = {"big": BIG, "nan": None, "text": "𝄞", "nested": [0.1, {"x": -BIG}]}
    assert r.outputs == {"a": expected, "b": expected}


def test_a_record_written_several_times_in_a_transaction_is_stored_once_as_its_last_version():
    """Records (node records, batch items, arrivals) are kept as they are until the commit encodes them with
    their own ``to_json`` (not msgspec's field-by-field encoding of a dataclass), and a read inside the
    transaction gets that JSON form."""
    import asyncio

    from flowcraft_cli.engine.state import REF, Arrival, NodeRecord, NodeStatus, read_node, write_node
    from flowcraft_cli.store import JOINS, NODES, MemoryStore

    store = MemoryStore()

    async def go():
        async def fn(t):
            write_node(t, "a", NodeRecord(status=NodeStatus.QUEUED, seq=1, attempt=1))
            write_node(t, "a", NodeRecord(status=NodeStatus.RUNNING, seq=1, attempt=1, token="tk"))
            t.put(JOINS, "arrival", Arrival(True, REF))
            assert await t.get(NODES, "a") == {"status": "running", "seq": 1, "runs": 0, "gen": 0, "attempt": 1,
                                               "token": "tk"}
            assert await t.get_many(JOINS, ["arrival"]) == {"arrival": {"t": True}}
        await store.transact("r", fn)

        async def check(t):
            return await read_node(t, "a")
        return await store.transact("r", check), store._runs["r"]

    rec, raw = asyncio.run(go())
    assert rec == NodeRecord(status=NodeStatus.RUNNING, seq=1, attempt=1, token="tk")
    # (a record of plain scalars is kept by the memory store as it was written, its last version)
    assert raw[NODES]["a"].to_json() == {"status": "running", "seq": 1, "runs": 0, "gen": 0, "attempt": 1,
                                         "token": "tk"}
    assert json.loads(raw[JOINS]["arrival"]) == {"t": True}


def test_the_memory_store_keeps_plain_records_as_they_are_and_every_read_gets_a_copy_of_its_own():
    """A node record of scalars is not encoded in memory; a reader that changes what it got changes nothing
    stored. A record holding a value (a loop's held arrival) is encoded, as any value."""
    import asyncio

    from flowcraft_cli.engine.state import Held, NodeRecord, NodeStatus, read_node, write_node
    from flowcraft_cli.store import NODES, MemoryStore

    store = MemoryStore()

    async def go():
        async def fn(t):
            write_node(t, "a", NodeRecord(status=NodeStatus.COMPLETED, seq=1, attempt=1))
            write_node(t, "c", NodeRecord(held=Held("b", {"deep": [1]})))
        await store.transact("r", fn)
        first = (await store.read("r", NODES, ["a"]))[0]
        first["status"] = "changed"
        (await store.read_all("r", NODES))["c"]["held"]["v"]["deep"].append(2)

        async def look(t):
            got = await t.get(NODES, "a")
            got["seq"] = 99
            return await read_node(t, "a"), await read_node(t, "c")
        return first, await store.transact("r", look), await store.read_all("r", NODES)

    first, (a, c), now = asyncio.run(go())
    assert first["status"] == "changed" and a.status == NodeStatus.COMPLETED and a.seq == 1
    assert c.held == Held("b", {"deep": [1]}) and now["c"]["held"] == {"src": "b", "v": {"deep": [1]}}
    assert now["a"] == {"status": "completed", "seq": 1, "runs": 0, "gen": 0, "attempt": 1}
    assert isinstance(store._runs["r"][NODES]["c"], str) and not isinstance(store._runs["r"][NODES]["a"], str)


def test_the_memory_store_hands_a_committed_record_to_later_transactions_only_while_it_is_what_is_stored():
    import asyncio

    from flowcraft_cli.engine.state import NodeRecord, NodeStatus, read_node, write_node
    from flowcraft_cli.store import MISSING, NODES, MemoryStore

    store = MemoryStore()
    first = NodeRecord(status=NodeStatus.QUEUED, seq=1, attempt=1)

    async def go():
        async def write(t):
            write_node(t, "a", first)
        await store.transact("r", write)

        async def recalled(t):
            return t.recall(NODES, "a"), await read_node(t, "a")
        again = await store.transact("r", recalled)

        async def overwrite(t):
            t.put(NODES, "a", {"status": "running", "seq": 1, "runs": 0, "gen": 0})  # a plain JSON write
        await store.transact("r", overwrite)
        after = await store.transact("r", recalled)
        return again, after

    (got, rec), (gone, fresh) = asyncio.run(go())
    assert got is first and rec is first
    assert gone is MISSING and fresh == NodeRecord(status=NodeStatus.RUNNING, seq=1)
