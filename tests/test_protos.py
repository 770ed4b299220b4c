"""The generated Python code must be what `python -m tools.gen_protos` makes from today's .proto files."""

from pathlib import Path

from tools.gen_protos import PROTO_ROOT, generate


def test_generated_code_is_current(tmp_path: Path):
    fresh = generate(tmp_path)
    assert fresh, "protoc generated nothing"
    for path in fresh:
        committed = PROTO_ROOT / path.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is missing: run `make protos`"
        assert committed.read_text() == path.read_text(), f"{committed} is stale: run `make protos`"
