"""Records in Prefect's layout, and the local directory store."""
from __future__ import annotations

import base64
import datetime
import json
import pickle

import pytest

from sync_worker.exceptions import ParameterReadError, SerializationError
from sync_worker.storage import (
    LocalDirectoryStore,
    RecordNotFound,
    dump_record,
    load_record,
    read_parameters,
    read_result,
    write_exception,
    write_parameters,
    write_result,
)


@pytest.fixture
def store(tmp_path):
    return LocalDirectoryStore(tmp_path / "records")


def test_json_record_has_prefects_layout():
    record = json.loads(dump_record({"a": [1, 2]}, "json", "key-1"))
    assert set(record) == {"metadata", "result"}
    assert record["metadata"]["storage_key"] == "key-1"
    assert record["metadata"]["serializer"]["type"] == "json"
    assert set(record["metadata"]) == {"storage_key", "expiration", "serializer", "prefect_version", "storage_block_id"}
    assert json.loads(record["result"]) == {"a": [1, 2]}


def test_parameters_round_trip(store):
    key = write_parameters(store, {"x": 1, "name": "é"})
    assert read_parameters(store, key) == {"parameters": {"x": 1, "name": "é"}, "context": {}}
    assert (store.path / "parameters" / key).exists()


def test_unserializable_parameter_is_named(store):
    with pytest.raises(SerializationError, match=r"'when' \(datetime\).*result_serializer='pickle'"):
        write_parameters(store, {"ok": 1, "when": datetime.datetime(2026, 1, 1)})
    assert not any(store.path.glob("*")) if store.path.exists() else True


def test_nan_is_refused_by_json():
    with pytest.raises(SerializationError):
        dump_record(float("nan"))


def test_pickle_needs_the_opt_in(store):
    key = write_parameters(store, {"when": datetime.date(2026, 1, 1)}, serializer="pickle")
    with pytest.raises(ParameterReadError, match="SYNC_WORKER_ALLOW_PICKLE=true"):
        read_parameters(store, key)
    assert read_parameters(store, key, allow_pickle=True)["parameters"] == {"when": datetime.date(2026, 1, 1)}


def test_reads_a_record_written_the_way_prefect_writes_pickles():
    # Prefect's PickleSerializer: base64.encodebytes(cloudpickle.dumps(obj)), picklelib named in metadata
    payload = base64.encodebytes(pickle.dumps({"parameters": {"x": 41}})).decode()
    data = json.dumps({
        "metadata": {"storage_key": "k", "expiration": None, "prefect_version": "3.8.8", "storage_block_id": None,
                     "serializer": {"type": "pickle", "picklelib": "cloudpickle", "picklelib_version": None}},
        "result": payload,
    }).encode()
    assert load_record(data, allow_pickle=True) == {"parameters": {"x": 41}}


def test_missing_and_corrupt_parameters_say_what_is_wrong(store):
    with pytest.raises(ParameterReadError, match="not found.*SYNC_WORKER_STORAGE"):
        read_parameters(store, "no-such-key")
    store.write("parameters/corrupt", b"{not json")
    with pytest.raises(ParameterReadError, match="not a valid record"):
        read_parameters(store, "corrupt")
    store.write("parameters/list", dump_record({"parameters": [1, 2]}))
    with pytest.raises(ParameterReadError, match="not a mapping"):
        read_parameters(store, "list")


def test_results_and_none(store):
    none = write_result(store, None)  # a Prefect caller needs a record even for None
    assert none["storage_key"] and read_result(store, none) is None
    assert read_result(store, None) is None
    data = write_result(store, {"total": 3})
    assert read_result(store, data) == {"total": 3}


def test_local_results_are_named_by_absolute_path_as_prefect_does(store, tmp_path):
    data = write_result(store, 2)
    assert data["storage_key"].startswith(str(store.path)) and json.loads(open(data["storage_key"]).read())
    assert read_result(store, data) == 2
    # a reader whose store is elsewhere does not follow the path (issue 9: confined records)
    with pytest.raises(SerializationError, match="outside the configured store"):
        read_result(LocalDirectoryStore(tmp_path / "elsewhere"), data)


def test_parameters_live_where_prefect_keeps_them(store):
    key = write_parameters(store, {"x": 1})
    assert (store.path / "parameters" / key).is_file()
    assert json.loads((store.path / "parameters" / key).read_text())["metadata"]["storage_key"] == key


def test_exception_record_has_the_traceback(store):
    try:
        raise ValueError("boom")
    except ValueError as exc:
        data = write_exception(store, exc)
    record = read_result(store, data)
    assert record["type"] == "ValueError" and record["message"] == "boom"
    assert record["__exc_type__"] == "builtins.ValueError"  # Prefect's decoder rebuilds it
    assert "Traceback" in record["traceback"] and 'raise ValueError("boom")' in record["traceback"]


def test_keys_cannot_escape_the_directory(store):
    with pytest.raises(ValueError, match="invalid record key"):
        store.write("../outside", b"x")
    with pytest.raises(ValueError, match="invalid record key"):
        store.write("parameters/../../x", b"x")
    with pytest.raises(RecordNotFound):
        store.read("missing")


def test_small_results_can_travel_inline_in_the_state(store):
    from sync_worker.storage import INLINE_RESULT_LIMIT, inline_result

    data = inline_result({"total": 3})
    assert data["metadata"]["serializer"]["type"] == "json" and data["metadata"]["storage_key"] is None
    assert read_result(store, json.loads(json.dumps(data))) == {"total": 3}  # survives the wire
    assert read_result(store, inline_result(None)) is None
    assert inline_result("x" * (INLINE_RESULT_LIMIT + 1)) is None  # too big: the caller writes a file
    assert not store.path.exists()


def test_the_store_of_a_directory_is_made_once_per_path(tmp_path):
    """get_store() runs on every .delay(): the same directory gives the same store object."""
    from sync_worker.settings import Settings
    from sync_worker.storage import get_store

    one = get_store(Settings(storage=str(tmp_path / "a")))
    assert get_store(Settings(storage=str(tmp_path / "a"))) is one
    other = get_store(Settings(storage=str(tmp_path / "b")))
    assert other is not one and other.path == tmp_path / "b"
    write_parameters(other, {"x": 1})
    assert [p.name for p in (tmp_path / "b" / "parameters").iterdir()]


def test_writes_leave_no_temp_files_and_survive_a_dead_writers_leftover(store):
    """Records are written to a temp name unique to the writing thread, then renamed; a
    leftover of a writer that died with the same pid and thread id does not block a write."""
    import os
    import threading

    key = write_parameters(store, {"x": 1})
    directory = store.path / "parameters"
    leftover = directory / f".tmp-{os.getpid()}-{threading.get_ident()}-again"
    leftover.write_bytes(b"half a record")
    store.write("parameters/again", b"{}")
    assert store.read("parameters/again") == b"{}"
    assert (directory / key).stat().st_mode & 0o777 == 0o600
    left = sorted(p.name for p in directory.iterdir() if p.name.startswith(".tmp-"))
    assert left == [leftover.name]  # only the dead writer's file; ours were renamed


def test_concurrent_writers_of_one_key_leave_one_whole_record(store):
    import threading

    payloads = [bytes([65 + i]) * 100_000 for i in range(8)]
    threads = [threading.Thread(target=store.write, args=("same", p)) for p in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert store.read("same") in payloads
    assert not [p for p in store.path.iterdir() if p.name.startswith(".tmp-")]


def test_our_json_records_name_no_object_decoder_except_a_failures():
    """Prefect's decoder, named in a record, makes Prefect's readers import the class a dict's
    "__class__" key names: our records hold JSON's types only, so they name none. A failure's
    record names it: a Prefect caller turns its ``__exc_type__`` into the exception."""
    import json as _json

    from sync_worker.storage import PREFECT_DECODER, describe_exception, dump_record, load_record

    plain = _json.loads(dump_record({"__class__": "evilmod.Thing", "data": {}}))
    assert plain["metadata"]["serializer"]["object_decoder"] is None
    assert load_record(plain) == {"__class__": "evilmod.Thing", "data": {}}
    failure = _json.loads(dump_record(describe_exception(ValueError("bad"))))
    assert failure["metadata"]["serializer"]["object_decoder"] == PREFECT_DECODER
    read = load_record(failure)  # read by sync_worker: the description, not an exception object
    assert read["type"] == "ValueError" and read["message"] == "bad" and read["traceback"] == "ValueError: bad\n"


def test_prefect_json_records_give_standard_library_values_and_refuse_other_classes():
    import datetime
    import json as _json
    import uuid

    from sync_worker.exceptions import SerializationError
    from sync_worker.storage import PREFECT_DECODER, load_record

    def prefect_record(value):
        return {"metadata": {"serializer": {"type": "json", "jsonlib": "json", "object_decoder": PREFECT_DECODER}},
                "result": _json.dumps(value)}

    value = load_record(prefect_record({"parameters": {
        "when": {"__class__": "datetime.datetime", "data": "2024-01-02T03:04:05.5Z"},
        "day": {"__class__": "datetime.date", "data": "2024-01-02"},
        "wait": {"__class__": "datetime.timedelta", "data": "-P1DT2H0.5S"},
        "id": {"__class__": "uuid.UUID", "data": "00000000-0000-0000-0000-000000000007"},
        "tags": {"__class__": "builtins.set", "data": ["a"]},
        "error": {"__exc_type__": "builtins.KeyError", "message": "k"},
    }}))["parameters"]
    assert value["when"] == datetime.datetime(2024, 1, 2, 3, 4, 5, 500000, tzinfo=datetime.timezone.utc)
    assert value["day"] == datetime.date(2024, 1, 2)
    assert value["wait"] == -datetime.timedelta(days=1, hours=2, seconds=0.5)
    assert value["id"] == uuid.UUID(int=7) and value["tags"] == {"a"}
    assert isinstance(value["error"], KeyError)
    with pytest.raises(SerializationError, match="'myapp.models.Order' object, which only Prefect's own decoder"):
        load_record(prefect_record({"order": {"__class__": "myapp.models.Order", "data": {"id": 1}}}))
    with pytest.raises(SerializationError, match="datetime.date value 'yesterday' is not valid"):
        load_record(prefect_record({"__class__": "datetime.date", "data": "yesterday"}))
