import pytest

from cast_core.errors import InvalidArgument, NotFound, ResourceExhausted
from cast_runtime.sessions import SessionStore


def test_session_store_cap_ttl_release():
    now = [0.0]
    store: SessionStore[str] = SessionStore(max_sessions=2, ttl_s=10, clock=lambda: now[0])
    store.create("a", "A")
    store.create("b", "B")
    with pytest.raises(ResourceExhausted):
        store.create("c", "C")
    now[0] = 5
    assert store.get("a") == "A"  # touching refreshes a
    now[0] = 12
    assert store.expire() == ["b"]
    store.create("c", "C")
    assert store.release(["a", "zzz"]) == 1
    with pytest.raises(NotFound, match="sequence_id"):
        store.get("a")
    with pytest.raises(InvalidArgument):
        store.create("c", "again")
