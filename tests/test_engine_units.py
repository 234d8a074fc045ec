"""The engine's decisions as pure functions, with no store at all: joins (all/any, dead-path skip, duplicate
arrivals), loops (controller decisions, iteration and generation counting, busy body) and routing (actions,
conditions, transforms). The scenario tests run the same rules end to end through both runtimes."""

from __future__ import annotations

from flowcraft_cli.blueprint import BREAK, CONTINUE, EdgeDef, JoinStrategy
from flowcraft_cli.engine import joins, loops, routing
from flowcraft_cli.engine.state import (
    REF,
    Arrival,
    BatchItem,
    Held,
    ItemStatus,
    JobKind,
    NodeRecord,
    NodeStatus,
    ParentRef,
    RunMeta,
    RunStatus,
    arrival_field,
    batch_state_field,
    count_field,
)
from flowcraft_cli.expressions import compile_expression


def edge(source: str, target: str, action: str | None = None, condition: str | None = None,
         transform: str | None = None) -> EdgeDef:
    return EdgeDef(source, target, action, condition and compile_expression(condition),
                   transform and compile_expression(transform))


def scope(output: object = None, action: str | None = None, **context: object) -> dict:
    return {"result": {"output": output, "action": action}, "input": None, **context}


# ---------------------------------------------------------------------------------------------- routing


def test_an_action_takes_its_own_edges_whose_condition_holds():
    edges = [edge("a", "b", "go"), edge("a", "c", "go", "result.output > 5"), edge("a", "d")]
    assert routing.select_edges(edges, "go", scope(3, "go"), []) == [edges[0]]
    assert routing.select_edges(edges, "go", scope(9, "go"), []) == edges[:2]


def test_without_a_matching_action_edge_the_default_edges_are_taken():
    edges = [edge("a", "b", "go"), edge("a", "c"), edge("a", "d", condition="x == 1")]
    assert routing.select_edges(edges, "stop", scope(x=2), []) == [edges[1]]
    assert routing.select_edges(edges, None, scope(x=1), []) == [edges[1], edges[2]]


def test_a_condition_that_fails_to_evaluate_is_false_and_noted():
    errors: list[str] = []
    edges = [edge("a", "b", condition="result.output['k'] > 1")]
    assert routing.select_edges(edges, None, scope(output=None), errors) == []
    assert len(errors) == 1 and errors[0].startswith("edge a->b condition")


def test_route_has_one_decision_per_target_with_the_transformed_value():
    edges = [edge("a", "b", transform="input * 10"), edge("a", "b", "other"), edge("a", "c", condition="False")]
    route = routing.route_edges(edges, None, scope(output=4), 4, "a", "run")
    assert [(d.target, d.taken) for d in route.decisions] == [("b", True), ("c", False)]
    assert route.decisions[0].value == 40 and route.errors == []


def test_an_untransformed_edge_delivers_the_source_output_by_reference():
    route = routing.route_edges([edge("a", "b")], None, scope(output=1), 1, "a", "run")
    assert route.decisions[0].value is REF


def test_a_transform_that_fails_counts_as_not_taken():
    route = routing.route_edges([edge("a", "b", transform="input['missing']")], None, scope(output={}), {}, "a", "r")
    assert not route.decisions[0].taken and "transform" in route.errors[0]


# ---------------------------------------------------------------------------------------------- joins


def test_an_all_join_waits_for_every_predecessor_then_fires_if_one_was_taken():
    assert joins.decide_join(JoinStrategy.ALL, 3, (2, 2)) == joins.JoinVerdict.WAIT
    assert joins.decide_join(JoinStrategy.ALL, 3, (3, 1)) == joins.JoinVerdict.FIRE


def test_an_all_join_whose_edges_were_all_not_taken_is_skipped():
    assert joins.decide_join(JoinStrategy.ALL, 2, (2, 0)) == joins.JoinVerdict.SKIP


def test_an_any_join_fires_on_its_first_taken_arrival_and_is_skipped_only_when_all_are_not():
    assert joins.decide_join(JoinStrategy.ANY, 3, (1, 1)) == joins.JoinVerdict.FIRE
    assert joins.decide_join(JoinStrategy.ANY, 3, (2, 0)) == joins.JoinVerdict.WAIT
    assert joins.decide_join(JoinStrategy.ANY, 3, (3, 0)) == joins.JoinVerdict.SKIP


def test_arrivals_count_decided_and_taken():
    counts = joins.count_arrival(None, True)
    counts = joins.count_arrival(counts, False)
    assert counts == (2, 1)


def test_a_node_decided_in_a_generation_ignores_late_arrivals_of_that_generation():
    assert not joins.decided_in(None, 0)
    assert joins.decided_in(NodeRecord(NodeStatus.COMPLETED, seq=1, gen=0, fired_gen=0), 0)
    assert not joins.decided_in(NodeRecord(NodeStatus.PENDING, seq=1, gen=1, fired_gen=0), 1)
    # a record that never stored fired_gen: decided unless it is pending
    assert joins.decided_in(NodeRecord(NodeStatus.COMPLETED, seq=1, gen=2), 2)
    assert not joins.decided_in(NodeRecord(NodeStatus.PENDING, gen=2), 2)


def test_a_node_moved_on_by_a_continue_is_rechecked_once_it_rests():
    assert joins.needs_recheck(NodeRecord(NodeStatus.COMPLETED, seq=1, gen=1, fired_gen=0))
    assert not joins.needs_recheck(NodeRecord(NodeStatus.RUNNING, seq=1, gen=1, fired_gen=0))
    assert not joins.needs_recheck(NodeRecord(NodeStatus.COMPLETED, seq=1, gen=1, fired_gen=1))


def test_a_join_input_is_the_taken_values_by_source_or_the_single_value():
    arrivals = {"a": Arrival(True, 1), "b": Arrival(False), "c": Arrival(True)}
    assert joins.join_input(["a", "b", "c"], arrivals, {"c": "out-c"}) == {"a": 1, "c": "out-c"}
    assert joins.join_input(["c"], {"c": Arrival(True)}, {"c": 7}) == 7
    assert joins.first_taken(["b", "c", "a"], arrivals) == "c"


def test_a_skip_marks_the_generation_and_keeps_the_rest_of_the_record():
    rec = joins.skipped(NodeRecord(NodeStatus.PENDING, seq=2, runs=1, gen=3, attempt=1), 3)
    assert (rec.status, rec.gen, rec.fired_gen, rec.seq, rec.runs) == (NodeStatus.SKIPPED, 3, 3, 2, 1)
    assert joins.skipped(None, 0).to_json() == {"status": "skipped", "seq": 0, "runs": 0, "gen": 0, "fired_gen": 0}


# ---------------------------------------------------------------------------------------------- loops


def loop_edges() -> list[EdgeDef]:
    return [edge("ctl", "body", CONTINUE), edge("ctl", "done", BREAK), edge("ctl", "alarm", condition="x > 100")]


def test_a_loop_continues_while_its_condition_holds_and_skips_nothing():
    d = loops.decide_loop(loop_edges(), compile_expression("x < 3"), scope(x=1), 0, 1000)
    assert d.action == CONTINUE and [e.target for e in d.chosen] == ["body"]
    assert [e.target for e in d.considered] == ["body"] and not d.capped


def test_a_loop_breaks_when_its_condition_fails():
    d = loops.decide_loop(loop_edges(), compile_expression("x < 3"), scope(x=5), 4, 1000)
    assert d.action == BREAK and [e.target for e in d.chosen] == ["done"] and not d.capped
    assert len(d.considered) == 3


def test_max_iterations_caps_a_loop():
    d = loops.decide_loop(loop_edges(), None, scope(x=0), 3, 3)
    assert d.action == BREAK and d.capped


def test_an_exit_edge_whose_condition_holds_breaks_the_loop_first():
    d = loops.decide_loop(loop_edges(), compile_expression("x < 1000"), scope(x=500), 0, 1000)
    assert d.action == BREAK and [e.target for e in d.chosen] == ["alarm"]


def test_a_loop_without_a_continue_edge_that_holds_breaks():
    edges = [edge("ctl", "body", CONTINUE, "False"), edge("ctl", "done")]
    d = loops.decide_loop(edges, None, scope(), 0, 10)
    assert d.action == BREAK and [e.target for e in d.chosen] == ["done"]


def test_firing_counts_seq_and_keeps_a_controllers_iterations_unless_entered_anew():
    ctl = NodeRecord(NodeStatus.COMPLETED, seq=4, runs=4, gen=0, iter=4, busy=0)
    again = loops.fired(ctl, is_controller=True, loop_entry=False, now_ms=9)
    assert (again.seq, again.iter, again.busy, again.runs, again.status) == (5, 4, 0, 4, NodeStatus.QUEUED)
    assert loops.fired(ctl, is_controller=True, loop_entry=True, now_ms=9).iter == 0
    plain = loops.fired(None, is_controller=False, loop_entry=False, now_ms=9)
    assert plain.to_json() == {"status": "queued", "seq": 1, "runs": 0, "gen": 0, "fired_gen": 0, "attempt": 1,
                               "phase": "exec", "queued_at": 9}


def test_a_body_is_busy_while_a_node_of_it_runs_or_an_inner_loop_holds_its_next_iteration():
    assert loops.body_busy(loops.with_busy(None, +1), [])
    assert not loops.body_busy(loops.with_busy(loops.with_busy(None, +1), -1), [])
    assert loops.with_busy(None, -1).busy == 0  # never below zero
    inner = NodeRecord(NodeStatus.COMPLETED, held=Held("x"))
    assert loops.body_busy(None, [inner])


def test_continue_moves_a_resting_body_node_to_the_next_generation_and_leaves_an_active_one():
    rec = loops.next_generation(NodeRecord(NodeStatus.COMPLETED, seq=2, runs=2, gen=1, fired_gen=1))
    assert rec is not None and (rec.status, rec.gen, rec.fired_gen) == (NodeStatus.PENDING, 2, 1)
    fresh = loops.next_generation(None)
    assert fresh is not None and (fresh.gen, fresh.fired_gen) == (1, -1)
    assert loops.next_generation(NodeRecord(NodeStatus.RUNNING, seq=1)) is None


def test_arrivals_from_outside_the_body_carry_over_into_the_next_generation():
    old = {"outside": Arrival(True, 5), "inner": Arrival(True), "gone": Arrival(False)}
    kept, counts = loops.carried_arrivals(["outside", "gone", "never"], old)
    assert kept == {"outside": Arrival(True, 5), "gone": Arrival(False)} and counts == (2, 1)


# ---------------------------------------------------------------------------------------------- records


def test_a_node_record_round_trips_its_stored_json_and_keeps_unknown_fields():
    stored = {"status": "running", "seq": 3, "runs": 1, "gen": 0, "fired_gen": 0, "attempt": 2, "phase": "fallback",
              "token": "t", "held": {"src": "b"}, "lost_in_row": 0, "from_a_newer_worker": [1]}
    rec = NodeRecord.from_json(stored)
    assert rec.phase == JobKind.FALLBACK and rec.held == Held("b") and rec.lost_in_row == 0
    assert rec.to_json() == stored


def test_a_null_field_reads_as_absent():
    assert NodeRecord.from_json({"status": "failed", "seq": 1, "runs": 1, "gen": 0, "error": None}).to_json() == \
        {"status": "failed", "seq": 1, "runs": 1, "gen": 0}


def test_batch_items_and_arrivals_keep_their_stored_shape():
    item = {"status": "running", "attempt": 1, "worker": "w", "job": "j", "token": "t", "lost_in_row": 1}
    assert BatchItem.from_json(item).status == ItemStatus.RUNNING and BatchItem.from_json(item).to_json() == item
    assert Arrival(True, 3).to_json() == {"t": True, "v": 3} and Arrival(False, 3).to_json() == {"t": False}
    assert Arrival.from_json({"t": True}).value is REF


def test_run_meta_reads_its_fields_and_writes_each_as_stored():
    meta = RunMeta.from_fields({"status": "awaiting", "pending": None, "parent": {"run_id": "p", "node_id": "n",
                                                                                   "seq": 1, "attempt": 2}})
    assert meta.status == RunStatus.AWAITING and meta.pending == 0 and meta.awaiting_nodes == []
    assert meta.parent == ParentRef("p", "n", 1, 2)
    assert meta.field_json("parent") == {"run_id": "p", "node_id": "n", "seq": 1, "attempt": 2}
    assert meta.field_json("status") == "awaiting"
    assert RunMeta.from_fields({}).status is None


def test_composite_field_names_escape_their_parts():
    assert arrival_field("t", 0, "s") == "t|0|s" and count_field("t", 0) == "t|0|#"
    assert arrival_field("a|b", 1, "#") != arrival_field("a", 1, "b|#")
    assert count_field("t", 0) != arrival_field("t", 0, "#")
    assert batch_state_field("n", 2, 5) == "n|2|s|5"


def test_only_a_join_of_several_predecessors_or_inside_a_loop_records_its_arrivals():
    """A node with one predecessor outside every loop is decided by that one arrival at once (its record then
    says so), so its arrival is not stored: a chain's steps write no join fields."""
    from flowcraft_cli.engine.reads import run_fields, tracks_arrivals
    from tests.harness import make_blueprints, make_registry

    doc = {"id": "mix", "nodes": [{"id": n, "uses": "tag"} for n in ("a", "b", "c", "j")],
           "edges": [{"source": "a", "target": "b"}, {"source": "a", "target": "c"},
                     {"source": "b", "target": "j"}, {"source": "c", "target": "j"}]}
    registry = make_registry({"tag": lambda ctx: None})
    bp = make_blueprints([doc], registry)["mix"]
    assert [n for n in ("a", "b", "c", "j") if tracks_arrivals(bp, n)] == ["j"]
    assert set(run_fields(bp)["joins"]) == {arrival_field("j", 0, "b"), arrival_field("j", 0, "c"),
                                            count_field("j", 0)}


def test_a_step_cancelled_after_its_nodes_timeout_fired_ends_without_waiting_for_the_node():
    """The node ignores both its timeout and the step's cancel (a stopping worker): the step still ends with
    the cancel while the node runs on, as asyncio.wait_for has it, rather than wait for the node."""
    import asyncio

    from flowcraft_cli.engine.builtins.function import _in_own_task

    state: dict[str, bool] = {"returned": False}

    async def stubborn() -> str:
        for _ in range(50):
            try:
                await asyncio.sleep(0.02)
            except asyncio.CancelledError:
                pass
        state["returned"] = True
        return "late"

    async def go() -> tuple[bool, bool]:
        timed_out = asyncio.Event()
        step = asyncio.create_task(_in_own_task(stubborn(), 0.05))
        asyncio.get_running_loop().call_later(0.1, timed_out.set)
        await timed_out.wait()  # the timeout has fired; the node ignored it
        step.cancel()  # the worker stops
        try:
            await step
            cancelled = False
        except asyncio.CancelledError:
            cancelled = True
        return cancelled, state["returned"]

    cancelled, returned = asyncio.run(go())
    assert cancelled and not returned


def test_the_idempotency_key_is_the_sha256_of_the_execution_s_compact_json_and_stays_so_across_releases():
    """A step redelivered to a worker of a newer release must be given the key its first attempt had."""
    import hashlib

    from flowcraft_cli.engine import idempotency_key

    text = '["run-1","n|é",3,-1]'
    assert idempotency_key("run-1", "n|é", 3) == "fc_" + hashlib.sha256(text.encode()).hexdigest()[:32]
    assert idempotency_key("run-1", "n|é", 3, 7) != idempotency_key("run-1", "n|é", 3)
