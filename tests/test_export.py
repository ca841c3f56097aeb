"""`fwsel export-selection`: every id in selected.jsonl comes back once, in order, with its text."""

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import fwsel.data
from fwsel import export

SELECTED = [  # (step, ids, weights) as the loop writes them
    (1, ["3:1:0", "3:1:5"], [1.0, 0.5]),
    (2, ["3:2:4", "3:2:1"], [2.0, 1.5]),
    (3, ["3:3:7", "3:3:2"], [0.25, 1.0]),
]


def make_run(path: Path, cfg: dict, selected=SELECTED, torn=True) -> Path:
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    lines = [json.dumps({"step": s, "ids": ids, "weights": w}) + "\n" for s, ids, w in selected]
    (path / "selected.jsonl").write_text("".join(lines) + ('{"step": 4, "ids": ["3:4' if torn else ""))
    return path


def fake_lookup(calls):
    def lookup_rows(cfg, ids):
        calls.append((cfg.seed, list(ids)))
        return [{"id": i, "source": f"src{i[-1]}", **({"text": f"t{i}"} if i.endswith("5")
                                                      else {"prompt": f"p{i}", "response": f"r{i}"})}
                for i in ids]
    return lookup_rows


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_export_roundtrips_ids(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(fwsel.data, "lookup_rows", fake_lookup(calls))
    monkeypatch.setattr(export, "CHUNK", 4)  # forces a lookup that spans two steps and a remainder
    run = make_run(tmp_path / "run", {"seed": 3, "data": {"kind": "synthetic"}})
    out = tmp_path / "sub" / "sel.jsonl"
    assert export.main([str(run), "--out", str(out)]) == 0
    assert "wrote 6 rows" in capsys.readouterr().out
    got = read_jsonl(out)
    want = [(s, i, w) for s, ids, ws in SELECTED for i, w in zip(ids, ws)]  # the torn last line is skipped
    assert [(r["step"], r["id"], r["weight"]) for r in got] == want
    assert [len(ids) for _, ids in calls] == [4, 2] and all(seed == 3 for seed, _ in calls)
    assert got[0] == {"id": "3:1:0", "step": 1, "weight": 1.0, "source": "src0", "prompt": "p3:1:0",
                      "response": "r3:1:0"}
    assert got[1] == {"id": "3:1:5", "step": 1, "weight": 0.5, "source": "src5", "text": "t3:1:5"}


def test_export_real_synthetic_rows(tmp_path):
    """No monkeypatch: ids of the embedded stream map back to the very rows of the pool."""
    conf = Path(fwsel.data.__file__).parents[2] / "conf"
    if not (conf / "data" / "synthetic.yaml").is_file():
        pytest.skip("conf/ not next to the package (installed from a wheel)")
    cfg = OmegaConf.create({"seed": 3, "data": OmegaConf.load(conf / "data" / "synthetic.yaml"),
                            "target": {"split_seed": 0, "select_size": 64, "eval_size": 256}})
    run = make_run(tmp_path / "run", OmegaConf.to_container(cfg))
    out = tmp_path / "sel.jsonl"
    assert export.export_selection(run, out) == 6
    stream = fwsel.data.build_data(cfg).stream
    for r in read_jsonl(out):
        seed, t, pos = map(int, r["id"].split(":"))
        row = stream.pool(t, pos + 1)[pos]
        assert row["id"] == r["id"] and r["source"] == row["source"]
        assert {k: v for k, v in r.items() if k not in ("step", "weight")} == row


@pytest.mark.parametrize("case", ["absent", "no_selected", "wrong_id"])
def test_export_errors(tmp_path, monkeypatch, capsys, case):
    monkeypatch.setattr(fwsel.data, "lookup_rows", lambda cfg, ids: [{"id": "x:y", "source": "s"} for _ in ids])
    run = make_run(tmp_path / "run", {"seed": 3}, torn=False)
    if case == "no_selected":
        (run / "selected.jsonl").unlink()
    target = tmp_path / "nope" if case == "absent" else run
    assert export.main([str(target), "--out", str(tmp_path / "o.jsonl")]) == 1
    err = capsys.readouterr().err
    expected = {"absent": "not a directory", "no_selected": "no selected.jsonl", "wrong_id": "for id '3:1:0'"}[case]
    assert expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("o.jsonl*"))  # nothing half-written left behind
