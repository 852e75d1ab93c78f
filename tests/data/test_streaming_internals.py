"""data_pipeline/readers.py subclasses mosaicml-streaming's StreamingDataset and leans on private
parts of it (setup.cfg bounds the version to the tested range). When a new release changes one of
them, this fails first, naming every one that changed, instead of a reader that hangs or skips."""
from __future__ import annotations

import inspect

import streaming
from streaming import StreamingDataset
from streaming.base import dataset as streaming_dataset

from tests.data.conftest import shapes_records, write_records

# method -> the parameters readers.py's overrides pass on (super() calls with these names)
METHODS = {
    "prepare_shard": ["shard_id", "blocking"],
    "get_item": ["sample_id", "retry"],
    "_prepare_thread": ["it"],
    "_ready_thread": ["it"],
    "on_exception": ["future"],
    "state_dict": ["num_samples", "from_beginning"],
    "load_state_dict": ["obj"],
}


def changed(problems: list[str]) -> str:
    return (f"mosaicml-streaming {streaming.__version__} changed internals data_pipeline/readers.py relies on "
            f"(CrossflowMDSDataset, MDSLoader, iter_mds_records):\n  " + "\n  ".join(problems) +
            "\nAdapt readers.py to the new release, then widen setup.cfg's mosaicml-streaming range.")


def test_streaming_methods_and_states_readers_override_are_there():
    problems = []
    for name, params in METHODS.items():
        method = getattr(StreamingDataset, name, None)
        if method is None:
            problems.append(f"StreamingDataset.{name} is gone")
            continue
        got = [p for p in inspect.signature(method).parameters if p != "self"]
        if got[:len(params)] != params:
            problems.append(f"StreamingDataset.{name}{tuple(got)}: expected parameters {tuple(params)}")
    states = getattr(streaming_dataset, "_ShardState", None)
    if states is None or not {"REMOTE", "PREPARING", "LOCAL"} <= set(getattr(states, "__members__", {})):
        problems.append("streaming.base.dataset._ShardState with REMOTE, PREPARING, LOCAL is gone")
    iterator = getattr(streaming_dataset, "_Iterator", None)
    if iterator is None or not callable(getattr(iterator, "on_exit", None)):
        problems.append("streaming.base.dataset._Iterator.on_exit (the epoch's exit report) is gone")
    assert not problems, changed(problems)


def test_streaming_dataset_attributes_readers_use_are_there(tmp_path):
    """On a real (tiny) MDS dataset: the per-shard state and bookkeeping readers.py reads and writes."""
    local = write_records("mds", str(tmp_path / "mds"), shapes_records(4))
    ds = StreamingDataset(local=local, batch_size=1, shuffle=False)
    problems = []
    for attr in ("streams", "shards", "stream_per_shard", "spanner", "_shard_states", "_shard_access_times"):
        if not hasattr(ds, attr):
            problems.append(f"StreamingDataset().{attr} is gone")
    if not problems:
        shard, stream = ds.shards[0], ds.streams[ds.stream_per_shard[0]]
        for what, ok in (("shard.raw_data.basename / .bytes", hasattr(getattr(shard, "raw_data", None), "bytes")
                          and hasattr(shard.raw_data, "basename")),
                         ("stream.local / .remote / .split", all(hasattr(stream, a) for a in ("local", "remote", "split"))),
                         ("stream._downloader.clean_up()", callable(getattr(getattr(stream, "_downloader", None),
                                                                            "clean_up", None))),
                         ("spanner[sample_id] -> (shard_id, index)", tuple(map(int, ds.spanner[0])) == (0, 0)),
                         ("_shard_states[shard_id] = _ShardState.LOCAL",
                          _assignable(ds._shard_states, 0, streaming_dataset._ShardState.LOCAL))):
            if not ok:
                problems.append(what)
    for stream in getattr(ds, "streams", []):
        stream._downloader.clean_up()
    assert not problems, changed(problems)


def _assignable(array, index: int, value) -> bool:
    old = array[index]
    array[index] = value
    ok = int(array[index]) == int(value)
    array[index] = old
    return ok
