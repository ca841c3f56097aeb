"""Pretrained checkpoints loaded by path (tiny Llama and Qwen3 saved with save_pretrained):
dtype, LoRA, pad token, gradient checkpointing under the engine, the saved adapter / model
reloading to the same logits, multiple-choice accuracy, and the unloadable-model line."""

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fwsel.data.collate import Collator
from fwsel.data.files import FileReader
from fwsel.errors import ConfigError
from fwsel.evaluate import evaluate
from fwsel.hub import save_model
from fwsel.modeling import build_model

from helpers_real import hf_cfg, write_jsonl

CPU = torch.device("cpu")


def randomise_lora_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def batch_for(tok, texts):
    return Collator(tok, 64)([{"id": str(i), "prompt": t[:8], "response": t[8:]} for i, t in enumerate(texts)])


@pytest.mark.parametrize("kind", ["llama", "qwen"])
def test_load_by_path_with_lora_and_pad(tiny_ckpts, kind, caplog):
    with caplog.at_level(logging.INFO):
        model, tok = build_model(hf_cfg(tiny_ckpts[kind]), CPU)
    assert next(model.parameters()).dtype == torch.float32  # dtype auto on the CPU
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"}
    assert model.training and tok.pad_token_id is not None
    if kind == "qwen":  # its tokenizer has no pad token: EOS pads, and the log says so
        assert tok.pad_token == tok.eos_token and "has no pad token: padding with its eos_token" in caplog.text
    full, _ = build_model(hf_cfg(tiny_ckpts[kind], {"lora.enabled": False, "model.dtype": "fp64"}), CPU)
    assert next(full.parameters()).dtype == torch.float64 and all(p.requires_grad for p in full.parameters())
    half, _ = build_model(hf_cfg(tiny_ckpts[kind], {"model.dtype": "bf16"}), CPU)
    assert {p.dtype for p in half.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in half.parameters() if p.requires_grad} == {torch.float32}  # adapters stay fp32
    allin, _ = build_model(hf_cfg(tiny_ckpts[kind], {"lora.target_modules": "all-linear"}), CPU)
    assert {n.split(".")[-4] for n, p in allin.named_parameters() if p.requires_grad} == \
        {n.split(".")[-4] for n in trainable}  # peft's all-linear: every projection, not the head


def test_saved_adapter_reloads_to_the_same_logits(tiny_ckpts, tmp_path):
    from peft import PeftModel

    model, tok = build_model(hf_cfg(tiny_ckpts["llama"]), CPU)
    randomise_lora_b(model)  # otherwise the adapter is a no-op and any reload would match
    out = save_model(model, tok, str(tmp_path / "model"))
    batch = batch_for(tok, ["The quick brown fox jumps", "What is the capital of France?"])
    model.eval()
    with torch.no_grad():
        want = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_ckpts["llama"]).eval()
        plain = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = PeftModel.from_pretrained(base, out).eval()(input_ids=batch["input_ids"],
                                                          attention_mask=batch["attention_mask"]).logits
    assert not torch.allclose(plain, want, atol=1e-4)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert AutoTokenizer.from_pretrained(out)("fox")["input_ids"] == tok("fox")["input_ids"]
    assert not (tmp_path / "model.tmp").exists()


def test_saved_full_model_reloads_to_the_same_logits(tiny_ckpts, tmp_path):
    model, tok = build_model(hf_cfg(tiny_ckpts["qwen"], {"lora.enabled": False}), CPU)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(0.05)
    out = save_model(model, tok, str(tmp_path / "model"))
    batch = batch_for(tok, ["The quick brown fox jumps", "reverse the word stone"])
    with torch.no_grad():
        want = model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=batch["input_ids"],
                                                               attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_engine_products_identical_with_gradient_checkpointing(tiny_ckpts):
    """Forward hooks fire again during recomputation: K and b must not change."""
    from fwsel.grads import GradEngine

    out = []
    for gc in (False, True):
        model, tok = build_model(hf_cfg(tiny_ckpts["qwen"], {"model.gradient_checkpointing": gc,
                                                              "model.dtype": "fp64"}), CPU)
        randomise_lora_b(model)
        assert model.base_model.model.is_gradient_checkpointing == gc
        pool = batch_for(tok, ["The quick brown fox jumps", "What is the capital?", "reverse the word", "hi there!!"])
        target = batch_for(tok, ["Translate to German: good", "Question: 2+2=? A. 3"])
        eng = GradEngine(model, None, metric="sgd")
        s = eng.score(pool, target, k=2)
        eng.close()
        out.append((s.K, s.b))
    assert out[0][0].abs().sum() > 0
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-10, atol=0)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-10, atol=0)


def test_mc_accuracy_by_option_likelihood(tiny_ckpts, tmp_path):
    model, tok = build_model(hf_cfg(tiny_ckpts["llama"], {"lora.enabled": False}), CPU)
    model.eval()
    from fwsel.data.formats import to_row

    questions = ["What is the capital of France?", "2+2=?", "Which word is reversed?", "Pick one.", "The fox is",
                 "Translate good morning", "Sky colour?", "Count to three"]
    choices = [["Paris", "Rome", "Oslo", "Bern"], ["3", "4", "5"], ["enots", "stone"], ["dog", "fox", "cat", "owl"],
               ["quick", "lazy", "brown"], ["guten Morgen", "bonjour"], ["blue", "green", "red"], ["1 2 3", "3 2 1"]]

    def oracle(q, ch):  # log-likelihood of " <letter>" after the prompt, from the model's own full logits
        scores = []
        for j in range(len(ch)):
            row = to_row({"question": q, "choices": ch, "answer": j}, "x:1")
            p = [tok.bos_token_id] + tok(row["prompt"], add_special_tokens=False)["input_ids"]
            o = tok(row["response"], add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = model(input_ids=torch.tensor([p + o])).logits[0].log_softmax(-1)
            scores.append(sum(float(logp[len(p) - 1 + t, o[t]]) for t in range(len(o))))
        return max(range(len(ch)), key=scores.__getitem__)

    best = [oracle(q, ch) for q, ch in zip(questions, choices)]
    col = Collator(tok, 64)
    for shift, acc in ((0, 1.0), (1, 0.0)):
        path = write_jsonl(tmp_path / f"mc{shift}.jsonl", [  # answers as letters, the way MMLU exports often give them
            {"question": q, "choices": ch, "answer": "ABCD"[(b + shift) % len(ch)]}
            for q, ch, b in zip(questions, choices, best)])
        rows = list(FileReader([path]))
        got = evaluate(model, col, rows, CPU, chunk_tokens=4096, batch_rows=3)
        assert got["target_eval_mc_acc"] == acc
    text = evaluate(model, col, [{"id": "t", "text": "The quick brown fox"}], CPU, chunk_tokens=4096)
    assert "target_eval_mc_acc" not in text and text["target_eval_ppl"] > 1


@pytest.mark.parametrize("name,line", [
    ("meta-llama/Llama-3.2-1B", "cannot load model 'meta-llama/Llama-3.2-1B': HF_HUB_OFFLINE is set and it is not "
                                "in the local HF cache; point at a local copy with model.name_or_path=/path/to/dir"),
    ("/no/such/dir", "cannot load model '/no/such/dir': no such directory; point at a local copy with "
                     "model.name_or_path=/path/to/dir"),
])
def test_unloadable_model_is_one_line(name, line):
    with pytest.raises(ConfigError) as e:
        build_model(hf_cfg(name), CPU)
    assert str(e.value).startswith(line) and "\n" not in str(e.value)


def test_dir_that_is_not_a_model(tmp_path, tiny_ckpts):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"cannot load the tokenizer from '.*empty'"):
        build_model(hf_cfg(str(tmp_path / "empty")), CPU)
    with pytest.raises(ConfigError, match=r"cannot load a causal LM from '.*empty'.*model.name_or_path=/path/to/dir"):
        build_model(hf_cfg(str(tmp_path / "empty"), {"model.tokenizer": tiny_ckpts["llama"]}), CPU)
