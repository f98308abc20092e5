"""(issue 9) Result records are read only inside the configured store, with a size bound: the
path in a state's data is chosen by whoever set the state."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from sync_worker import storage
from sync_worker.exceptions import SerializationError
from sync_worker.storage import LocalDirectoryStore, RecordNotFound, read_result, write_result


def test_a_result_inside_the_store_is_read(tmp_path: Path):
    store = LocalDirectoryStore(tmp_path / "store")
    metadata = write_result(store, {"answer": 42})
    assert os.path.isabs(metadata["storage_key"])  # Prefect's convention: an absolute path
    assert read_result(store, metadata) == {"answer": 42}


@pytest.mark.parametrize("path", ["/etc/passwd", "/dev/zero", "{store}/../outside", "{store}/../../etc/hostname"])
def test_paths_outside_the_store_are_not_read(tmp_path: Path, path: str):
    store = LocalDirectoryStore(tmp_path / "store")
    (tmp_path / "store").mkdir()
    (tmp_path / "outside").write_text('{"result": "secret"}')
    with pytest.raises(SerializationError, match="outside the configured store"):
        read_result(store, {"storage_key": path.format(store=tmp_path / "store")})


def test_a_symlink_out_of_the_store_is_not_followed(tmp_path: Path):
    store = LocalDirectoryStore(tmp_path / "store")
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "link").symlink_to("/etc/passwd")
    with pytest.raises(SerializationError, match="outside the configured store"):
        read_result(store, {"storage_key": str(tmp_path / "store" / "link")})


def test_devices_fifos_and_huge_files_in_the_store_are_not_read(tmp_path: Path, monkeypatch):
    store = LocalDirectoryStore(tmp_path / "store")
    (tmp_path / "store").mkdir()
    os.mkfifo(tmp_path / "store" / "fifo")
    with pytest.raises(SerializationError, match="not a regular file"):
        read_result(store, {"storage_key": str(tmp_path / "store" / "fifo")})
    (tmp_path / "store" / "big").write_bytes(b"x" * 2048)
    monkeypatch.setattr(storage, "MAX_RECORD_SIZE", 1024)
    with pytest.raises(SerializationError, match="over the 1024 byte limit"):
        read_result(store, {"storage_key": str(tmp_path / "store" / "big")})
    with pytest.raises(RecordNotFound):
        read_result(store, {"storage_key": str(tmp_path / "store" / "missing")})


def test_a_server_store_reads_no_local_paths(tmp_path: Path):
    class Remote:
        def read(self, key: str) -> bytes:  # pragma: no cover - must not be reached
            raise AssertionError(key)

    with pytest.raises(SerializationError, match="outside the configured store"):
        read_result(Remote(), {"storage_key": "/etc/passwd"})  # type: ignore[arg-type]


def test_a_result_record_written_after_its_state_is_waited_for(tmp_path: Path):
    """Prefect's worker writes the record after it reports COMPLETED: a caller reading at once
    got RecordNotFound (17 of 30 in a QA run); Prefect's own futures look again, 10 x 0.25 s."""
    import threading

    from sync_worker.tasks import _read_result_written_late

    store = LocalDirectoryStore(tmp_path / "store")
    metadata = write_result(store, {"answer": 42})
    written = Path(metadata["storage_key"]).read_bytes()
    os.unlink(metadata["storage_key"])
    timer = threading.Timer(0.6, lambda: Path(metadata["storage_key"]).write_bytes(written))
    timer.start()
    try:
        assert _read_result_written_late(store, metadata, False) == {"answer": 42}
    finally:
        timer.cancel()
    os.unlink(metadata["storage_key"])
    with pytest.raises(RecordNotFound):  # never written: the error, after the last look
        _read_result_written_late(store, metadata, False)
