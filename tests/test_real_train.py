"""`fwsel train` end to end on checkpoints loaded by path and local data (in-process, a few
steps): every gradient selector, chat/MC/instruction rows, target from the stream, data=hf
from a local dir, the saved adapter, and the one-line error for an unloadable model."""

import json

import pytest

from fwsel.cli import main

from helpers_real import write_jsonl

LONG = " ".join(["the quick brown fox jumps over the lazy dog"] * 12)  # > 64 tokens: cut to max_position_embeddings


def run_cli(args, capsys):
    try:
        code = main(["train", *args])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out + out.err


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_jsonl(root / "train" / "qa.jsonl", [{"prompt": f"What is {i}+{i}?", "response": f" {2 * i}"}
                                              for i in range(12)] + [{"prompt": LONG, "response": " end"}])
    write_jsonl(root / "train" / "chat.jsonl", [
        {"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}], "source": "chat"}
        for w in ("hi", "fox", "dog", "cat", "owl", "sun", "sky", "sea")])
    write_jsonl(root / "train" / "alpaca.jsonl", [{"instruction": "Reverse the word.", "input": w, "output": w[::-1]}
                                                  for w in ("stone", "quick", "brown", "lazy", "jumps", "paris")])
    write_jsonl(root / "target.jsonl", [{"question": f"{i}+{i}=?", "choices": [str(2 * i), str(2 * i + 1)],
                                         "answer": 0} for i in range(10)])
    return root


def common(files, run_dir, **over):
    """The shared overrides; `over` replaces or adds keys (dots written as __)."""
    kv = {"data.files": files / "train" / "*.jsonl", "data.target_files": files / "target.jsonl", "steps": 2,
          "eval_every": 2, "batch_size": 2, "budget": 0.5, "target.batch_size": 2, "target.select_size": 4,
          "target.eval_size": 4, "lora.r": 2, "hydra.run.dir": run_dir, "progress": "false"}
    kv.update({k.replace("__", "."): v for k, v in over.items()})
    return [f"{k}={v}" for k, v in kv.items() if v is not None]


@pytest.mark.parametrize("selector", ["ftw", "greats", "tracin"])
def test_train_llama_by_path_each_selector(selector, tiny_ckpts, files, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / "run"
    code, text = run_cli(["model=llama", f"model.name_or_path={tiny_ckpts['llama']}", "data=jsonl",
                          f"selector={selector}", *common(files, run)], capsys)
    assert code == 0, text
    s = json.loads((run / "summary.json").read_text())
    assert s["status"] == "ok" and s["steps_done"] == 2 and s["selector"] == selector
    assert s["target_eval_mc_acc"] is not None and 0 <= s["target_eval_mc_acc"] <= 1 and s["target_eval_ppl"] > 1
    assert s["data_skipped"] == 0 and s["data_unsupervised"] == 0
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2] and "target_eval_mc_acc" in rows[-1]
    assert all(set(r["selected_per_source"]) <= {"qa", "chat", "alpaca"} for r in rows[1:])
    model_dir = run / "model"
    assert s["model_dir"] == str(model_dir) and (model_dir / "adapter_config.json").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_ckpts["llama"])
    peft = PeftModel.from_pretrained(base, str(model_dir))
    assert any(n for n, _ in peft.named_parameters() if "lora_A" in n)
    assert AutoTokenizer.from_pretrained(str(model_dir)).eos_token == "</s>"


def test_train_qwen_target_from_stream(tiny_ckpts, files, tmp_path, capsys):
    run = tmp_path / "run"
    code, text = run_cli(["model=qwen", f"model.name_or_path={tiny_ckpts['qwen']}", "data=jsonl",
                          "selector=random", "target.from_stream=6", "data.target_source=qa", "save_model=false",
                          *common(files, run, data__target_files=None, data__shuffle_buffer=100, budget=1.0, steps=10,
                                  eval_every=10)], capsys)
    assert code == 0, text
    s = json.loads((run / "summary.json").read_text())
    assert s["status"] == "ok" and "model_dir" not in s and not (run / "model").exists()
    assert "target_eval_mc_acc" not in s  # the target rows are prompt/response, not multiple choice
    sel = [i for r in read_jsonl(run / "selected.jsonl") for i in r["ids"]]
    qa = f"{files / 'train' / 'qa.jsonl'}:"
    assert len(sel) == 20 and len(set(sel)) == 20  # 20 of the 27 - 6 stream rows, each once
    assert not {f"{qa}{n}" for n in range(1, 7)} & set(sel)  # the target rows never train
    assert len([i for i in sel if i.startswith(qa)]) >= 5  # ... while the later qa rows do


def test_long_row_is_cut_to_max_position_embeddings(tiny_ckpts, files, tmp_path, capsys):
    rows = [{"prompt": "q", "response": " a b"}, {"prompt": LONG, "response": " end"}, {"text": LONG}]
    train = write_jsonl(tmp_path / "long.jsonl", rows + [{"prompt": "q", "response": " a"}] * 3)
    run = tmp_path / "run"
    code, text = run_cli(["model=hf", f"model.name_or_path={tiny_ckpts['llama']}", "data=jsonl", "selector=random",
                          "save_model=false", "lora.enabled=false",
                          *common(files, run, data__files=train, data__max_len=4096, data__shuffle_buffer=0,
                                  budget=1.0)], capsys)
    assert code == 0, text  # without the cut to 64 positions the long rows would overflow the position table
    s = json.loads((run / "summary.json").read_text())
    assert s["status"] == "ok" and s["data_truncated"] == 2


def test_train_data_hf_local_dir(tiny_ckpts, tmp_path, capsys):
    ds = tmp_path / "ds"
    rows = [{"question": f"{i}+1=?", "choices": [str(i + 1), str(i + 2)], "answer": 0} for i in range(40)]
    write_jsonl(ds / "train.jsonl", rows[:30])
    write_jsonl(ds / "validation.jsonl", rows[30:])
    run = tmp_path / "run"
    code, text = run_cli(["model=hf", f"model.name_or_path={tiny_ckpts['qwen']}", "data=hf", f"data.name={ds}",
                          "selector=ftw", "save_model=false",
                          *common(tmp_path, run, data__files=None, data__target_files=None)], capsys)
    assert code == 0, text
    s = json.loads((run / "summary.json").read_text())
    assert s["status"] == "ok" and 0 <= s["target_eval_mc_acc"] <= 1


def compose(overrides):
    from hydra import compose as hcompose
    from hydra import initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module("fwsel.conf", version_base="1.3"):
        return OmegaConf.to_container(hcompose("train", overrides=overrides), resolve=True)


def test_model_groups_and_validation():
    from omegaconf import OmegaConf

    from fwsel.config import validate
    from fwsel.train import changed_keys

    llama, moved = compose(["model=llama"]), compose(["model=llama", "model.name_or_path=/my/copy"])
    assert changed_keys(llama, moved) == ["model.name_or_path"]  # only the weights and tokenizer change
    assert llama["model"]["name_or_path"] == "meta-llama/Llama-3.2-1B" and llama["lora"]["enabled"]
    assert llama["save_model"] and not compose([])["save_model"] and not compose([])["lora"]["enabled"]
    qwen = compose(["model=qwen", "data=hf", "data.name=cais/mmlu", "data.config=all"])
    assert qwen["model"]["name_or_path"] == "Qwen/Qwen3-0.6B" and qwen["save_model"]
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert qwen["lora"]["target_modules"] == projections
    assert qwen["data"]["target_config"] == "all"
    assert compose(["model=hf", "model.name_or_path=x"])["lora"]["target_modules"] == "all-linear"
    for cfg in (llama, qwen, compose(["model=hf", "model.name_or_path=x", "data=jsonl", "data.files=a.jsonl"])):
        validate(OmegaConf.create(cfg))
    with pytest.raises(Exception, match="model.dtype must be one of auto|bf16"):
        validate(OmegaConf.create(compose(["model=qwen", "model.dtype=int8"])))


def test_unloadable_model_cli_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    code, text = run_cli(["model=llama", f"hydra.run.dir={run}", "progress=false"], capsys)
    assert code == 1 and "Traceback" not in text
    assert "cannot load model 'meta-llama/Llama-3.2-1B'" in text and "model.name_or_path=/path/to/dir" in text
    assert "no run dir kept" in text and not run.exists()  # a config error before the first step


def test_bad_data_line_stops_with_file_and_line(tiny_ckpts, tmp_path, capsys):
    train = tmp_path / "train.jsonl"
    write_jsonl(train, [{"prompt": "a b", "response": " c"}] * 3)
    with open(train, "a") as f:
        f.write('{"prompt": "x", "response": 5}\n')
    target = write_jsonl(tmp_path / "t.jsonl", [{"text": "the lazy dog"}] * 4)
    args = ["model=hf", f"model.name_or_path={tiny_ckpts['llama']}", "data=jsonl", f"data.files={train}",
            f"data.target_files={target}", "selector=random", "steps=3", "batch_size=2", "budget=1.0",
            "data.shuffle_buffer=0", "save_model=false", f"hydra.run.dir={tmp_path / 'run'}", "progress=false"]
    code, text = run_cli(args, capsys)
    assert code == 1 and f"{train}:4: field 'response' must be a string, got int" in text and "Traceback" not in text
    assert len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == 2  # step 0 eval and step 1 kept
    code, text = run_cli([*args[:-2], "data.on_error=skip", f"hydra.run.dir={tmp_path / 'skip'}", "progress=false"],
                         capsys)
    s = json.loads((tmp_path / "skip" / "summary.json").read_text())
    assert code == 0 and s["status"] == "exhausted" and s["data_skipped"] == 1
