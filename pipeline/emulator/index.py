"""Per-value indexes: for each value, the ascending keys of the sessions that hold it."""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections.abc import Iterable

from pipeline.emulator.catalog import TAG_VOCABULARY, TYPE_TASKS
from pipeline.emulator.generate import Population

EMPTY_KEYS = array("q")


class KeyIndex:
    """value -> sorted keys; the smallest matching list drives a filtered walk."""

    def __init__(self, lists: dict[str, array] | None = None) -> None:
        self._lists: dict[str, array] = lists or {}

    def keys_for(self, value: str) -> array:
        return self._lists.get(value, EMPTY_KEYS)

    def add(self, values: Iterable[str], key: int) -> None:
        for value in values:
            keys = self._lists.setdefault(value, array("q"))
            position = bisect_left(keys, key)
            if position == len(keys) or keys[position] != key:
                keys.insert(position, key)

    def remove(self, values: Iterable[str], key: int) -> None:
        for value in values:
            keys = self._lists.get(value)
            if keys is None:
                continue
            position = bisect_left(keys, key)
            if position < len(keys) and keys[position] == key:
                del keys[position]


def contains(keys: array, key: int) -> bool:
    position = bisect_left(keys, key)
    return position < len(keys) and keys[position] == key


def build_indexes(population: Population) -> tuple[KeyIndex, KeyIndex, KeyIndex]:
    """(by type, by taskIdentifier, by tag) for the generated sessions, in one pass."""
    types = sorted({pair[0] for pair in TYPE_TASKS})
    tasks = sorted({pair[1] for pair in TYPE_TASKS})
    type_lists = {name: array("q") for name in types}
    task_lists = {name: array("q") for name in tasks}
    tag_lists = {name: array("q") for name in TAG_VOCABULARY}
    # Bound appends, looked up by code, keep the million-iteration loop free of dict work.
    type_append = [type_lists[pair[0]].append for pair in TYPE_TASKS]
    task_append = [task_lists[pair[1]].append for pair in TYPE_TASKS]
    combo_appends = [
        tuple(tag_lists[tag].append for tag in combo) for combo in population.pools.tag_combos
    ]
    for key, pair, combo in zip(
        population.keys, population.pair_codes, population.combo_codes, strict=True
    ):
        type_append[pair](key)
        task_append[pair](key)
        for append in combo_appends[combo]:
            append(key)
    return KeyIndex(type_lists), KeyIndex(task_lists), KeyIndex(tag_lists)
