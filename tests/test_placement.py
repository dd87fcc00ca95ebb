import collections

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shardchat import placement


def test_placement_single_slot():
    assert placement.place("anything", 1) == 0


def test_placement_rejects_zero_slots():
    with pytest.raises(ValueError, match="invalid slot count 0"):
        placement.place("x", 0)


@given(st.text(min_size=1), st.integers(min_value=1, max_value=32))
def test_placement_in_range_and_stable(key, slots):
    slot = placement.place(key, slots)
    assert 0 <= slot < slots
    assert placement.place(key, slots) == slot


def test_placement_known_values_are_stable_across_processes():
    # Fixed expectations catch an accidental switch to Python's salted hash().
    assert [placement.place(f"chat-{i}", 4) for i in range(8)] == [
        placement.place(f"chat-{i}", 4) for i in range(8)
    ]
    import subprocess
    import sys

    code = "from shardchat import placement; print([placement.place(f'chat-{i}', 4) for i in range(8)])"
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert output == str([placement.place(f"chat-{i}", 4) for i in range(8)])


def test_placement_spreads_keys_evenly():
    counts = collections.Counter(placement.place(f"user-{i}", 4) for i in range(4000))
    assert set(counts) == {0, 1, 2, 3}
    assert min(counts.values()) > 800


def test_placement_growth_moves_few_keys():
    keys = [f"chat-{i}" for i in range(3000)]
    moved = sum(placement.place(key, 4) != placement.place(key, 5) for key in keys)
    # Rendezvous hashing moves about 1/5 of the keys when going from 4 to 5 slots.
    assert moved < 0.3 * len(keys)
    moved_to_new = sum(
        placement.place(key, 5) == 4
        for key in keys
        if placement.place(key, 4) != placement.place(key, 5)
    )
    assert moved_to_new == moved
