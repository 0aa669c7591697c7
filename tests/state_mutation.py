"""What the state fuzz tests mutate a real policy state with: JSON values
(near-valid numbers, the edges of the ranges, NaN, wrong types) put at any
place in it. Shared by tests/test_policy_state.py and the range test's."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import strategies as st


def json_leaves(*extra: Any) -> st.SearchStrategy[Any]:
    """Leaves a state could hold or nearly hold; ``extra``: a kind's own
    (its phase names, say)."""
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-3, 40),  # counters near the real ones: states that load
        st.sampled_from([2**53, 2**53 + 1, 2**63, 2**70, -(2**53), 10**400]),
        st.floats(allow_nan=True, allow_infinity=True),
        st.floats(0.0, 1.0),
        st.sampled_from([1e308, 5e-324, -0.0, 1e200, *extra]),
        st.text(max_size=4),
    )


def json_values(leaves: st.SearchStrategy[Any], max_size: int = 3) -> st.SearchStrategy[Any]:
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.lists(inner, max_size=max_size),
            st.dictionaries(st.text(max_size=4), inner, max_size=3),
        ),
        max_leaves=2 * max_size,
    )


def paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in a state: the whole, each field, each list element."""
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += paths(item, (*prefix, i))
    return found


def replaced(state: Any, path: tuple, value: Any, delete: bool = False) -> Any:
    """A copy of ``state`` with ``value`` at ``path`` (or that key deleted)."""
    if not path:
        return value
    state = copy.deepcopy(state)
    parent = state
    for part in path[:-1]:
        parent = parent[part]
    if delete and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return state
