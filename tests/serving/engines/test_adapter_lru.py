"""The adapter residency rules both engines share: LRU order, pins, deferred unloads."""

from __future__ import annotations

from serving.engines.adapter_lru import AdapterLRU


def loaded(capacity: int, *ids: str) -> AdapterLRU:
    lru = AdapterLRU(capacity)
    for adapter_id in ids:
        assert lru.make_room() == []
        lru.add(adapter_id)
    return lru


def test_least_recently_used_idle_adapter_makes_room():
    lru = loaded(2, "a", "b")
    assert lru.touch("a") and not lru.touch("c")
    assert lru.make_room() == ["b"]
    lru.add("c")
    assert lru.ids == ("a", "c")


def test_pinned_adapters_are_never_evicted_and_go_when_released_over_capacity():
    lru = loaded(2, "a", "b")
    lru.pin("a")
    lru.pin("b")
    assert lru.make_room() == []  # both in use: over capacity
    lru.add("c")
    lru.pin("c")
    assert lru.ids == ("a", "b", "c")
    assert lru.release("c") == ["c"]  # the only idle one, and one too many
    lru.pin("a")
    assert lru.release("a") == []  # still one user
    assert lru.ids == ("a", "b")


def test_unload_waits_for_the_last_user_and_a_load_cancels_it():
    lru = loaded(4, "a", "b")
    assert lru.unload("a") == (True, ["a"])
    assert lru.unload("a") == (False, [])
    lru.pin("b")
    assert lru.unload("b") == (True, [])
    assert lru.ids == () and "b" in lru
    assert lru.unload("b") == (False, [])  # already on its way out
    assert lru.release("b") == ["b"]
    assert "b" not in lru

    lru.add("c")
    lru.pin("c")
    lru.unload("c")
    assert lru.touch("c")  # loaded again before its request ended: it stays
    assert lru.release("c") == [] and lru.ids == ("c",)
