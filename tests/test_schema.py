"""One model, one schema: msgspec records decode, validate and describe snapshot files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from memtop.errors import MemtopError
from memtop.export import encode_json, read_snapshot, snapshot_to_dict

from .conftest import REPLAY, REPO
from .test_cli import assert_one_line_error, run


def test_published_json_schema_is_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/gen_schema.py", "--check"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_json_schema_names_every_top_level_field_of_a_written_snapshot() -> None:
    schema = json.loads((REPO / "docs" / "snapshot.schema.json").read_text())
    top = schema["$defs"]["Snapshot"]["properties"]
    written = snapshot_to_dict(read_snapshot(REPLAY))
    assert set(written) <= set(top)
    assert top["schema"]["enum"] == ["memtop.snapshot/1"]


def _changed(tmp_path: Path, change) -> Path:  # type: ignore[no-untyped-def]
    doc = json.loads(REPLAY.read_text())
    change(doc)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    return path


def test_integer_too_large_for_64_bits_is_a_one_line_schema_error(tmp_path: Path) -> None:
    path = _changed(tmp_path, lambda d: d["processes"][0].__setitem__("kmalloc_bytes", 10**400))
    with pytest.raises(MemtopError, match=r"does not match memtop.snapshot/1.*processes\[0\].kmalloc_bytes"):
        read_snapshot(path)
    result = run("--replay", str(path))
    assert result.returncode == 1  # bad input, not the internal-error exit (70)
    assert_one_line_error(result, "does not match memtop.snapshot/1")


@pytest.mark.parametrize(
    ("change", "where"),
    [
        (lambda d: d["processes"][0].__setitem__("rss_bytes", -1), "processes[0].rss_bytes"),
        (lambda d: d.__setitem__("duration_s", "long"), "duration_s"),
        (lambda d: d["processes"][0].__setitem__("kmalloc_history", [[1, 2]]), "kmalloc_history"),
        (lambda d: d.__setitem__("leaks", [{"kind": "nope"}]), "leaks[0]"),
    ],
)
def test_bad_values_name_their_path(tmp_path: Path, change, where: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(MemtopError, match="does not match") as info:
        read_snapshot(_changed(tmp_path, change))
    assert where in str(info.value)
    assert "\n" not in str(info.value)


def test_truncated_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "cut.json"
    path.write_bytes(REPLAY.read_bytes()[:4000])
    assert_one_line_error(run("--replay", str(path)), "is not valid JSON")


def test_compact_json_round_trips() -> None:
    from memtop.export import decode_json

    snap = read_snapshot(REPLAY)
    line = encode_json(snap)
    assert b"\n" not in line
    assert decode_json(line) == snap


def test_every_field_of_the_store_records_is_declared_on_the_wire() -> None:
    """A field added to a store record but not to memtop/schema.py would be lost in files and recordings."""
    import dataclasses

    from memtop import schema
    from memtop.leaks import LeakRow
    from memtop.oom import OomEvent
    from memtop.store import ContainerRow, ProcessRow
    from memtop.tcp import SlowConnect, TcpRow

    pairs = [
        (ProcessRow, schema.Process, {"kmalloc_history"}),
        (ContainerRow, schema.Container, {"history"}),
        (OomEvent, schema.OomKill, {"time_iso"}),
        (LeakRow, schema.Leak, set()),
        (TcpRow, schema.TcpConnect, set()),
        (SlowConnect, schema.SlowConnect, set()),
    ]
    for record, wire, wire_only in pairs:
        fields = {f.name for f in dataclasses.fields(record)}
        assert set(wire.__struct_fields__) == fields | wire_only, record.__name__
