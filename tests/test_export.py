import json
import os
import stat
from pathlib import Path

import pytest

from memtop.errors import MemtopError
from memtop.export import SCHEMA, read_snapshot, snapshot_to_dict, write_snapshot

from .conftest import REPLAY

REQUIRED_PROCESS_FIELDS = {
    "pid",
    "comm",
    "cmdline",
    "cgroup_path",
    "container_id",
    "kmalloc_bytes_per_s",
    "kmalloc_calls_per_s",
    "kmalloc_bytes",
    "kmalloc_calls",
    "rss_bytes",
}


REQUIRED_CONTAINER_FIELDS = {
    "id",
    "name",
    "runtime",
    "pod_uid",
    "pod_name",
    "namespace",
    "qos",
    "cgroup_path",
    "pids",
    "kmalloc_bytes_per_s",
    "kmalloc_calls_per_s",
    "memory_bytes",
    "memory_limit_bytes",
}


def test_fixture_has_the_documented_schema() -> None:
    doc = json.loads(REPLAY.read_text())
    assert doc["schema"] == SCHEMA == "memtop.snapshot/1"
    assert doc["taken_at"].endswith("Z")
    assert {"hostname", "kernel"} <= set(doc["host"])
    assert doc["probes"]["kmalloc"]["status"] == "running"
    containers = {c["id"]: c for c in doc["containers"]}
    assert len(containers) == 3
    for container in containers.values():
        assert set(container) >= REQUIRED_CONTAINER_FIELDS
    for process in doc["processes"]:
        assert set(process) >= REQUIRED_PROCESS_FIELDS
        assert (
            process["container_id"] is None
            or process["exited"]  # the container lists the processes in its cgroup now
            or process["pid"] in containers[process["container_id"]]["pids"]
        )


def test_round_trip_is_identical(tmp_path: Path) -> None:
    snap = read_snapshot(REPLAY)
    assert snap.replay
    out = write_snapshot(tmp_path / "again.json", snap)
    again = read_snapshot(out)
    assert snapshot_to_dict(again) == snapshot_to_dict(snap)
    assert again.focus is not None and again.focus.reading is not None
    assert again.focus.reading.call_sites[0].symbol.startswith("listxattr")


def test_written_file_is_0600_and_atomic(tmp_path: Path) -> None:
    snap = read_snapshot(REPLAY)
    target = tmp_path / "s.json"
    target.write_text("old")
    os.chmod(target, 0o644)
    write_snapshot(target, snap)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert json.loads(target.read_text())["schema"] == SCHEMA
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]  # no temp file left behind


def test_refuses_to_write_through_a_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    link = tmp_path / "link.json"
    link.symlink_to(victim)
    with pytest.raises(MemtopError, match="symlink"):
        write_snapshot(link, read_snapshot(REPLAY))
    assert victim.read_text() == "keep me"


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(MemtopError, match="directory does not exist"):
        write_snapshot(tmp_path / "nope" / "s.json", read_snapshot(REPLAY))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json at all", "not valid JSON"),
        ("[1, 2]", "top level is not a JSON object"),
        ('{"schema": "other/9"}', "schema is 'other/9'"),
        ('{"schema": "memtop.snapshot/1", "host": {"hostname": "h", "kernel": "k"}}', "missing field"),
        (
            '{"schema": "memtop.snapshot/1", "taken_at": "2026-01-01T00:00:00Z", "duration_s": 1,'
            ' "host": {"hostname": "h", "kernel": "k"}, "processes": [{"pid": "x"}]}',
            "processes\\[0\\].pid",
        ),
    ],
)
def test_corrupt_files_give_one_line_errors(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(MemtopError, match=message) as info:
        read_snapshot(path)
    assert "\n" not in str(info.value)


def test_missing_and_directory_paths(tmp_path: Path) -> None:
    with pytest.raises(MemtopError, match="not found"):
        read_snapshot(tmp_path / "absent.json")
    with pytest.raises(MemtopError, match="is a directory"):
        read_snapshot(tmp_path)
