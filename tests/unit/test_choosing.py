"""Which models a node takes jobs of: at most as many as fit, what it has first, and a model
whose jobs wait with no node taken on in place of one nobody waits for."""

from __future__ import annotations

from ollama_worker.choosing import Demand, Move, adoption, committed

A, B, C = "a:1b", "b:1b", "c:1b"
IDLE, BUSY = Demand(0, 1), Demand(9, 1)


def test_a_node_keeps_what_it_took_and_prefers_what_is_in_memory() -> None:
    assert committed([], {A, B}, [], A, 1) == [A]  # nothing loaded yet: the default
    assert committed([], {A, B}, [B], A, 1) == [B]  # the server holds another: that one
    assert committed([A], {A, B}, [A, B], A, 1) == [A]  # both in memory: it keeps its own
    assert committed([A], {A, B}, [B], A, 1) == [B]  # its own left memory, another came
    assert committed([B], {A, B}, [], A, 1) == [B]  # taken on earlier, not loaded yet
    assert committed([B], {A}, [], A, 1) == [A]  # its server stopped serving it
    assert committed([], {B}, [], A, 1) == []  # nothing loaded, the default absent
    assert committed([], {A, B, C}, [C], A, None) == [C, A, B]  # unlimited: all it serves
    assert committed([A], {A, B, C}, [C, B], A, 2) == [C, B]


def test_a_model_nobody_runs_is_taken_on_where_there_is_room_or_a_spare_model() -> None:
    waiting = {B: Demand(5, 0), C: Demand(7, 0)}
    found = {A, B}
    # Room left: the one most jobs wait for that it can have (C must be pulled).
    assert adoption([A], waiting, {A: BUSY}, found=found, can_fetch=True, limit=2) == Move(C, None)
    assert adoption([A], waiting, {A: BUSY}, found=found, can_fetch=False, limit=2) == Move(B, None)
    # Full: in place of a model no job waits for, or one another node serves too.
    assert adoption([A], waiting, {A: IDLE}, found=found, can_fetch=False, limit=1) == Move(B, A)
    shared = Demand(9, 2)
    assert adoption([A], waiting, {A: shared}, found=found, can_fetch=False, limit=1) == Move(B, A)
    # Never in place of a model whose jobs wait for this node alone: no swap per job.
    assert adoption([A], waiting, {A: BUSY}, found=found, can_fetch=False, limit=1) is None


def test_nothing_moves_for_a_model_another_node_runs_or_no_job_waits_for() -> None:
    own = {A: IDLE}
    taken = {B: Demand(5, 1)}
    assert adoption([A], taken, own, found={A, B}, can_fetch=True, limit=1) is None
    assert adoption([A], {B: Demand(0, 0)}, own, found={A, B}, can_fetch=True, limit=1) is None
    assert adoption([A], {C: Demand(3, 0)}, own, found={A}, can_fetch=False, limit=1) is None
    assert adoption([A, B], {A: Demand(3, 0)}, own, found={A}, can_fetch=True, limit=3) is None
