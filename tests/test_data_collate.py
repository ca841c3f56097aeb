"""Response-only masking, token by token, with real (locally trained BPE) tokenizers; chat rows
with and without a chat template; truncation from the left of the prompt; unsupervised rows
dropped and counted."""

import pytest
from transformers import AutoTokenizer

from fwsel.data import Data
from fwsel.data.collate import Collator
from fwsel.data.files import FileReader, IterStream
from fwsel.errors import ConfigError, DataError
from fwsel.hub import set_pad_token

from helpers_real import write_jsonl


@pytest.fixture(scope="module")
def toks(tiny_ckpts):
    out = {}
    for k, path in tiny_ckpts.items():
        out[k] = AutoTokenizer.from_pretrained(path)
        set_pad_token(out[k])
    return out


def enc(tok, s):
    return tok(s, add_special_tokens=False)["input_ids"]


def test_prompt_response_labels_token_by_token(toks):
    tok = toks["llama"]
    col = Collator(tok, 512)
    rows = [{"id": "a", "prompt": "What is the capital of France?", "response": " Paris."},
            {"id": "b", "prompt": "Q:", "response": " the lazy dog jumps"}]
    b = col(rows)
    for j, row in enumerate(rows):
        p, r = enc(tok, row["prompt"]), enc(tok, row["response"]) + [tok.eos_token_id]
        want_ids = [tok.bos_token_id] + p + r
        n = len(want_ids)
        assert b["input_ids"][j, :n].tolist() == want_ids
        assert b["labels"][j, :n].tolist() == [-100] * (1 + len(p)) + r  # loss on response + EOS only
        assert b["attention_mask"][j].tolist() == [1] * n + [0] * (b["input_ids"].shape[1] - n)
        assert b["labels"][j, n:].eq(-100).all() and b["input_ids"][j, n:].eq(tok.pad_token_id).all()
        sup = [t for t, lab in zip(b["input_ids"][j].tolist(), b["labels"][j].tolist()) if lab != -100]
        assert tok.decode(sup) == row["response"] + tok.eos_token


def test_text_rows_supervise_every_token(toks):
    tok = toks["qwen"]  # no BOS
    ids, labels, cut = Collator(tok, 512).encode({"id": "t", "text": "The quick brown fox"})
    assert ids == enc(tok, "The quick brown fox") + [tok.eos_token_id] and labels == ids and not cut


def test_chat_with_template_supervises_the_last_assistant_turn(toks):
    tok = toks["qwen"]
    assert tok.pad_token == tok.eos_token  # no pad token of its own: EOS pads
    msgs = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi"},
            {"role": "user", "content": "how are you?"}, {"role": "assistant", "content": "fine, thanks"}]
    ids, labels, _ = Collator(tok, 512).encode({"id": "c", "messages": msgs})
    assert ids == enc(tok, tok.apply_chat_template(msgs, tokenize=False))
    sup = [t for t, lab in zip(ids, labels) if lab != -100]
    assert labels[len(ids) - len(sup):] == sup and all(x == -100 for x in labels[: len(ids) - len(sup)])
    assert tok.decode(sup) == "fine, thanks<|im_end|>\n"  # the earlier assistant turn is not supervised


def test_chat_without_template_uses_the_plain_template(toks):
    tok = toks["llama"]
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]
    ids, labels, _ = Collator(tok, 512).encode({"id": "c", "messages": msgs})
    prompt = enc(tok, "user: hello\nassistant: ")
    assert ids == [tok.bos_token_id] + prompt + enc(tok, "hi there") + [tok.eos_token_id]
    assert labels == [-100] * (1 + len(prompt)) + enc(tok, "hi there") + [tok.eos_token_id]


def test_truncation_cuts_the_prompt_from_the_left_and_keeps_the_response(toks):
    tok = toks["llama"]
    row = {"id": "a", "prompt": "The quick brown fox jumps over the lazy dog.", "response": " Paris."}
    p, r = enc(tok, row["prompt"]), enc(tok, row["response"]) + [tok.eos_token_id]
    col = Collator(tok, 1 + len(r) + 3)
    ids, labels, cut = col.encode(row)
    assert cut and ids == [tok.bos_token_id] + p[-3:] + r and labels == [-100] * 4 + r
    short = Collator(tok, 3)  # the response alone does not fit: it is cut from the right
    ids, labels, cut = short.encode(row)
    assert cut and ids == [tok.bos_token_id] + r[:2] and labels == [-100] + r[:2]
    col([row, row])
    assert col.truncated == 2


def test_unsupervised_rows_are_dropped_and_counted(toks, tmp_path):
    tok = toks["qwen"]
    tok_no_eos = Collator(tok, 512)
    tok_no_eos.eos = []  # as a tokenizer without EOS: an empty response leaves nothing to learn
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "a", "response": ""},
                                              {"text": "c d"}, {"text": ""}] * 3)
    stream = IterStream(FileReader([path]), seed=0)
    data = Data(stream, [{"id": "s", "prompt": "x", "response": "y"}, {"id": "s2", "prompt": "x", "response": ""}],
                [{"id": "e", "text": "zz"}])
    data.attach(tok_no_eos)
    assert [r["id"] for r in data.select] == ["s"]
    rows = stream.pool(0, 6)
    assert [r["id"].rsplit(":", 1)[1] for r in rows] == ["1", "3", "5", "7", "9", "11"]
    assert data.counts() == {"data_skipped": 0, "data_unsupervised": 5, "data_truncated": 0}  # read up to line 11
    assert stream.pool(1, 6) == [] and data.counts()["data_unsupervised"] == 6
    with pytest.raises(ConfigError, match="the target eval split has no row with a supervised token left"):
        Data(stream, [{"id": "s", "text": "the lazy dog"}], [{"id": "e", "text": ""}]).attach(tok_no_eos)


def test_chat_template_error_names_the_row_or_is_skipped(tiny_ckpts, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_ckpts["qwen"])
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
                         "{% endif %}{{ m['content'] }}\n{% endfor %}")
    ok = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    bad = {"messages": [{"role": "system", "content": "x"}, *ok["messages"]]}
    path = write_jsonl(tmp_path / "chat.jsonl", [ok, bad, ok])
    for on_error in ("raise", "skip"):
        stream = IterStream(FileReader([path], on_error=on_error), seed=0, on_error=on_error)
        stream.row_filter = Collator(tok, 64).check
        if on_error == "raise":
            with pytest.raises(DataError, match=rf"^{path}:2: the tokenizer's chat template failed .*no system role"):
                stream.pool(0, 2)
        else:
            assert [r["id"] for r in stream.pool(0, 2)] == [f"{path}:1", f"{path}:3"] and stream.skipped == 1
