"""benchmarks/pyspy_summary.py: samples split by thread, each function counted once per sample."""

from benchmarks.pyspy_summary import function_name, summarize

RAW = """\
main (srv.py:1);run_forever (asyncio/base_events.py:607);_run_once (asyncio/base_events.py:1884);select (selectors.py:468) 70
main (srv.py:1);run_forever (asyncio/base_events.py:607);_run_once (asyncio/base_events.py:1884);verify (servicer.py:77);tree_from_proto (servicer.py:40) 20
main (srv.py:1);run_forever (asyncio/base_events.py:607);_run_once (asyncio/base_events.py:1884);verify (servicer.py:90) 10
_bootstrap (threading.py:1002);_worker (concurrent/futures/thread.py:93);forward (model.py:10);forward (model.py:12) 40
_bootstrap (threading.py:1002);poll (grpc.py:5) 5
"""


def test_samples_are_split_by_thread_and_counted_once_per_stack():
    out = summarize(RAW.splitlines())
    assert {kind: total for kind, (total, _) in out.items()} == {"event loop": 100, "worker": 40, "other": 5}
    loop = out["event loop"][1]
    assert loop["verify (servicer.py)"] == 30  # two lines of one function: one row
    assert loop["tree_from_proto (servicer.py)"] == 20
    assert out["worker"][1]["forward (model.py)"] == 40  # recursion counts once per sample


def test_function_names_drop_the_line_number():
    assert function_name("verify (verify_service/servicer.py:77)") == "verify (verify_service/servicer.py)"
    assert function_name("<module>") == "<module>"
