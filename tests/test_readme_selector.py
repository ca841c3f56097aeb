"""The README's "Write a selector" example, taken from the README itself, trains for 2 steps."""

import json
import re
from pathlib import Path

from helpers_runs import run_cli

README = Path(__file__).resolve().parents[1] / "README.md"


def section_blocks() -> dict[str, str]:
    text = README.read_text()
    sec = text.split("## Write a selector\n", 1)[1].split("\n## ", 1)[0]
    return {lang: body for lang, body in re.findall(r"```(\w+)\n(.*?)```", sec, flags=re.S)}


def test_readme_selector_example_trains(tmp_path, monkeypatch, capsys):
    blocks = section_blocks()
    (tmp_path / "myselect.py").write_text(blocks["python"])
    (tmp_path / "conf_extra" / "selector").mkdir(parents=True)
    (tmp_path / "conf_extra" / "selector" / "cosine.yaml").write_text(blocks["yaml"])
    command = blocks["bash"].split()
    assert command[:2] == ["PYTHONPATH=.", "fwsel"]
    args = [a.strip('"') for a in command[2:] if not a.startswith("steps=")]
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # what PYTHONPATH=. does
    code, out = run_cli([*args, "steps=2", "eval_every=2", "target.eval_size=16", "progress=false",
                         f"hydra.run.dir={tmp_path / 'run'}"], capsys)
    assert code == 0, out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["selector"] == "cosine" and summary["steps_done"] == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["examples_trained"] for r in rows[1:]] == [8, 16]  # k = 8 rows with cos > 0 each step
