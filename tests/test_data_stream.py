"""File and `datasets` streams: pool t = rows [t*n, (t+1)*n) of the seeded stream, the same
order for a seed whatever was read before (replay), target sets from files, splits or the
stream itself (then removed from training)."""

import json

import pytest
from omegaconf import OmegaConf

from fwsel.data import build_data, lookup_rows
from fwsel.data.files import FileReader, IterStream
from fwsel.errors import ConfigError

from helpers_real import write_jsonl


def rows_file(tmp_path, n=50, name="train.jsonl"):
    return write_jsonl(tmp_path / name, [{"prompt": f"p{i}", "response": f"r{i}", "source": ("a", "b")[i % 2]}
                                         for i in range(n)])


def cfg_for(data, seed=0, **target):
    t = {"select_size": 4, "eval_size": 8, "split_seed": 0, "from_stream": None, **target}
    return OmegaConf.create({"seed": seed, "data": {"source_field": "source", "on_error": "raise", **data},
                             "target": t})


def ids(pool):
    return [r["id"] for r in pool]


def test_pools_are_consecutive_slices_of_a_seeded_order(tmp_path):
    path = rows_file(tmp_path)
    full = ids(IterStream(FileReader([path]), seed=3, shuffle_buffer=16).pool(0, 50))
    assert sorted(full) == sorted(ids(FileReader([path]))) and full != ids(FileReader([path]))  # shuffled
    s = IterStream(FileReader([path]), seed=3, shuffle_buffer=16)
    assert ids(s.pool(4, 5)) == full[20:25]  # skipping ahead
    assert ids(s.pool(1, 5)) == full[5:10]  # going back replays from the start
    assert ids(s.pool(2, 5)) == full[10:15]
    assert ids(IterStream(FileReader([path]), seed=4, shuffle_buffer=16).pool(0, 50)) != full
    assert ids(IterStream(FileReader([path]), seed=3, shuffle_buffer=0).pool(0, 50)) == ids(FileReader([path]))
    assert s.pool(9, 6) == [] and len(s.pool(8, 6)) == 2  # runs out: a short or empty pool


def test_row_filter_counts_and_replay_resets_counts(tmp_path):
    path = rows_file(tmp_path, 20)
    s = IterStream(FileReader([path]), seed=0, shuffle_buffer=0)
    s.row_filter = lambda r: (int(r["prompt"][1:]) % 5 != 0, int(r["prompt"][1:]) % 3 == 0)  # (usable, truncated)
    pool = s.pool(0, 8)
    assert [r["prompt"] for r in pool] == ["p1", "p2", "p3", "p4", "p6", "p7", "p8", "p9"]
    assert s.counts() == {"data_skipped": 0, "data_unsupervised": 2, "data_truncated": 4}
    s.pool(0, 8)  # replay: counted again from zero, not doubled
    assert s.counts()["data_unsupervised"] == 2


def test_jsonl_build_with_target_files_and_skip_counts(tmp_path):
    train = rows_file(tmp_path)
    with open(train, "a") as f:
        f.write("{broken\n")
    target = write_jsonl(tmp_path / "target.jsonl", [{"prompt": f"t{i}", "response": "x"} for i in range(10)])
    d = build_data(cfg_for({"kind": "jsonl", "files": train, "target_files": target, "shuffle_buffer": 8,
                            "on_error": "skip"}))
    assert len(d.select) == 4 and len(d.eval) == 6 and not {r["id"] for r in d.select} & {r["id"] for r in d.eval}
    assert d.stream.known_size == 51  # lines counted cheaply (the broken one included)
    assert len(d.stream.pool(0, 51)) == 50 and d.counts()["data_skipped"] == 1
    with pytest.raises(ConfigError, match="no target set: set data.target_files, or target.from_stream"):
        build_data(cfg_for({"kind": "jsonl", "files": train}))
    with pytest.raises(ConfigError, match="data.files is required for data=jsonl"):
        build_data(cfg_for({"kind": "jsonl", "files": None}))


def test_target_from_stream_is_removed_from_training(tmp_path):
    train = rows_file(tmp_path, 40)
    d = build_data(cfg_for({"kind": "jsonl", "files": train, "target_source": "b", "shuffle_buffer": 8},
                           from_stream=10))
    target = {r["id"] for r in d.select + d.eval}
    want = {f"{train}:{i}" for i in range(2, 21, 2)}  # the first 10 rows of source b (odd i -> lines 2, 4, ...)
    assert target == want
    stream = ids(d.stream.pool(0, 100))
    assert len(stream) == 30 and not target & set(stream) and d.stream.known_size == 30
    with pytest.raises(ConfigError, match="target.from_stream=30 but the stream has only 20 rows of source 'b'"):
        build_data(cfg_for({"kind": "jsonl", "files": train, "target_source": "b"}, from_stream=30))
    with pytest.raises(ConfigError, match="target.from_stream applies to data=jsonl|hf"):
        build_data(cfg_for({"kind": "synthetic"}, from_stream=10))


def test_hf_local_dir_streams_deterministically_and_exports(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    write_jsonl(root / "train.jsonl", [{"question": f"q{i}", "choices": ["x", "y"], "answer": i % 2, "subject": "s"}
                                       for i in range(30)])
    write_jsonl(root / "validation.jsonl", [{"question": f"v{i}", "choices": ["x", "y"], "answer": 0, "subject": "t"}
                                            for i in range(12)])
    data = {"kind": "hf", "name": str(root), "config": None, "split": "train", "target_split": "validation",
            "target_config": None, "shuffle_buffer": 8, "source_field": "subject"}
    a, b = build_data(cfg_for(data, seed=1)), build_data(cfg_for(data, seed=1))
    pa = a.stream.pool(2, 5)
    assert ids(pa) == ids(b.stream.pool(0, 15))[10:]
    assert ids(pa) != ids(build_data(cfg_for(data, seed=2)).stream.pool(2, 5))
    assert pa[0]["id"].startswith(f"{root}:train:") and pa[0]["source"] == "s" and "choices" in pa[0]
    prompts = sorted(r["prompt"] for r in a.select + a.eval)
    assert prompts == sorted(f"v{i}\nA. x\nB. y\nAnswer:" for i in range(12))
    assert lookup_rows(cfg_for(data, seed=1), ids(pa)) == pa
    from_stream = build_data(cfg_for(data, from_stream=6))  # wins over the default target split
    from_ids = sorted(r["id"] for r in from_stream.select + from_stream.eval)
    assert from_ids == sorted(f"{root}:train:{i}" for i in range(6))
    limited = build_data(cfg_for({**data, "target_limit": 6}))
    assert sorted(int(r["prompt"].split("\n")[0][1:]) for r in limited.select + limited.eval) == list(range(6))
    nope = r"cannot load dataset '.*nope'.*point at a local copy with data.name=/path/to/dir"
    with pytest.raises(ConfigError, match=nope):
        build_data(cfg_for({**data, "name": str(tmp_path / "nope")}))
    with pytest.raises(ConfigError, match=r"cannot load dataset 'no-such-org/no-such-set': HF_HUB_OFFLINE is set"):
        build_data(cfg_for({**data, "name": "no-such-org/no-such-set"}))


def test_export_lookup_for_files(tmp_path):
    train = rows_file(tmp_path, 10)
    cfg = cfg_for({"kind": "jsonl", "files": train, "target_files": train, "format": "auto", "fields": {}})
    got = lookup_rows(cfg, [f"{train}:3", f"{train}:1"])
    assert [r["prompt"] for r in got] == ["p2", "p0"]
    assert json.loads(json.dumps(got)) == got
