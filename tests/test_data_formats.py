"""Local files in every supported format map to the right rows; bad data gives one clear line
naming file and line, or is skipped and counted with on_error=skip."""

import gzip
import json

import pytest

from fwsel.data.files import FileReader, expand, read_record, skip_or_raise
from fwsel.data.formats import ALPACA, to_row
from fwsel.errors import ConfigError, DataError

from helpers_real import write_jsonl

RECORDS = [
    {"text": "plain text", "source": "web"},
    {"prompt": "Q: 1+1?", "response": "2"},
    {"prompt": "Q: 2+2?", "completion": "4"},
    {"instruction": "Add.", "input": "1 and 2", "output": "3"},
    {"instruction": "Say hi.", "output": "hi"},
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                  {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
                  {"role": "assistant", "content": "ciao"}, {"role": "user", "content": "dropped"}]},
    {"question": "2+2?", "choices": ["3", "4", "5"], "answer": 1},
    {"question": "Sky?", "choices": ["green", "blue"], "answer": "B"},
    {"question": "Sun?", "choices": ["hot", "cold"], "answer": "hot"},
]


def test_each_format_maps_to_its_row(tmp_path):
    path = write_jsonl(tmp_path / "mix.jsonl", RECORDS)
    rows = list(FileReader([path]))
    assert [r["id"] for r in rows] == [f"{path}:{i}" for i in range(1, 10)]
    assert rows[0] == {"id": f"{path}:1", "source": "web", "text": "plain text"}
    assert all(r["source"] == "mix" for r in rows[1:])  # no source field: the file stem
    assert (rows[1]["prompt"], rows[1]["response"]) == ("Q: 1+1?", "2")
    assert (rows[2]["prompt"], rows[2]["response"]) == ("Q: 2+2?", "4")
    assert rows[3]["prompt"] == "### Instruction:\nAdd.\n\n### Input:\n1 and 2\n\n### Response:\n"
    assert rows[4]["prompt"] == ALPACA.format(instruction="Say hi.", input="") and rows[4]["response"] == "hi"
    msgs = rows[5]["messages"]
    assert [m["content"] for m in msgs] == ["be brief", "hi", "hello", "bye", "ciao"]  # ends at the last assistant turn
    assert rows[6]["prompt"] == "2+2?\nA. 3\nB. 4\nC. 5\nAnswer:" and rows[6]["response"] == " B"
    assert [r["answer"] for r in rows[6:]] == [1, 1, 0]
    assert [r["response"] for r in rows[6:]] == [" B", " B", " A"]


def test_field_mapping_and_source_field():
    obj = {"q": "why?", "a": "because", "task": "qa"}
    row = to_row(obj, "f.jsonl:3", source_field="task", fields={"prompt": "q", "response": "a"})
    assert (row["prompt"], row["response"], row["source"]) == ("why?", "because", "qa")
    with pytest.raises(DataError, match=r"f.jsonl:3: data.fields names columns \['zz'\]"):
        to_row(obj, "f.jsonl:3", fields={"prompt": "zz", "response": "a"})


def test_parquet_json_array_text_and_gzip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"prompt": f"p{i}", "response": f"r{i}", "source": "pq"} for i in range(5)]),
                   tmp_path / "a.parquet", row_group_size=2)
    (tmp_path / "b.json").write_text(json.dumps([{"instruction": "x", "output": "y"}, {"text": "t"}]))
    (tmp_path / "c.txt").write_text("line one\n\nline two\n")
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "zipped"}) + "\n")
    reader = FileReader(expand(str(tmp_path / "*"), "data.files"))
    rows = list(reader)
    assert [r["id"].rsplit("/", 1)[1] for r in rows] == [
        "a.parquet:1", "a.parquet:2", "a.parquet:3", "a.parquet:4", "a.parquet:5", "b.json:1", "b.json:2",
        "c.txt:1", "c.txt:3", "d.jsonl.gz:1"]
    assert [r.get("response") for r in rows[:5]] == [f"r{i}" for i in range(5)] and rows[0]["source"] == "pq"
    assert rows[6]["text"] == "t" and rows[6]["source"] == "b"
    assert [r["text"] for r in rows[7:]] == ["line one", "line two", "zipped"] and rows[9]["source"] == "d"
    assert reader.count() is None  # a .gz or .json file: not counted up front
    assert FileReader([str(tmp_path / "a.parquet"), str(tmp_path / "c.txt")]).count() == 7
    for r in rows:  # every id reads back to the same row (export)
        path, n = r["id"].rsplit(":", 1)
        assert read_record(path, int(n)) == r


def test_glob_list_and_no_match(tmp_path):
    a = write_jsonl(tmp_path / "x" / "a.jsonl", [{"text": "a"}])
    b = write_jsonl(tmp_path / "y" / "b.jsonl", [{"text": "b"}])
    assert expand([str(tmp_path / "x" / "*.jsonl"), b], "data.files") == [a, b]
    assert expand(str(tmp_path / "**" / "*.jsonl"), "data.files") == [a, b]
    with pytest.raises(ConfigError, match="data.files: no file matches"):
        expand(str(tmp_path / "nothing*.jsonl"), "data.files")
    with pytest.raises(ConfigError, match=r"unknown file type '.csv'; set data.format="):
        FileReader([str(tmp_path / "z.csv")])


BAD = [
    ('{"text": "ok"}\n{"text": \n', 2, "malformed JSON"),
    ('{"text": "ok"}\n[1, 2]\n', 2, "expected an object with named fields, got list"),
    ('{"text": "ok"}\n{"prompt": "only a prompt"}\n', 2, "no known format (a row needs text | prompt+response"),
    ('{"text": "ok"}\n{"prompt": "p", "response": 3}\n', 2, "field 'response' must be a string, got int"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', 1, "'messages' has no assistant turn"),
    ('{"messages": [{"role": "user"}]}\n', 1, "messages[0] must be an object with string 'role' and 'content'"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 5}\n', 1, "'answer' must be an index, a letter"),
    ('{"question": "q", "choices": "ab", "answer": 0}\n', 1, "'choices' must be a list of 2 to 26 strings"),
]


@pytest.mark.parametrize("content,line,msg", BAD, ids=[b[2][:24] for b in BAD])
def test_bad_record_names_file_and_line_or_is_skipped(tmp_path, content, line, msg):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as e:
        list(FileReader([str(path)]))
    text = str(e.value)
    assert text.startswith(f"{path}:{line}: ") and msg in text and "\n" not in text
    reader = FileReader([str(path)], on_error="skip")
    rows = list(reader)
    assert reader.skipped == 1 and len(rows) == content.count("\n") - 1
    list(reader)  # a replay counts from zero again
    assert reader.skipped == 1


def test_empty_file_and_bad_parquet(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match=r"empty.jsonl: empty file \(no rows\)$"):  # skipping it would not help
        list(FileReader([str(empty)]))
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "a"}])
    reader = FileReader([str(empty), good], on_error="skip")
    assert [r["text"] for r in reader] == ["a"] and reader.skipped == 1
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="broken.parquet: not a readable parquet file"):
        list(FileReader([str(broken)]))
    with pytest.raises(ConfigError, match="data.on_error must be raise|skip"):
        FileReader([good], on_error="ignore")


def test_skip_or_raise_is_the_one_on_error_rule(caplog):
    """Files, the hf reader and the tokenizer side share it: raise with the hint (or without,
    where skipping cannot help), or log and count once."""
    import logging

    err, log = DataError("a.jsonl:3: malformed JSON (x)"), logging.getLogger("fwsel.test")
    with pytest.raises(DataError, match=r"^a.jsonl:3: malformed JSON \(x\) \(data.on_error=skip skips such records\)$"):
        skip_or_raise(err, "raise", log)
    with pytest.raises(DataError, match=r"^a.jsonl:3: malformed JSON \(x\)$"):
        skip_or_raise(err, "raise", log, hint=False)
    with caplog.at_level(logging.WARNING, "fwsel.test"):
        assert skip_or_raise(err, "skip", log) == 1 and skip_or_raise(err, "skip", log, count=False) == 0
    assert [r.getMessage() for r in caplog.records] == ["skipping a.jsonl:3: malformed JSON (x)"]
