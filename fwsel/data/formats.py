"""Record -> row: the common instruction-tuning formats mapped to one of three row shapes.

A row is `{id, source, text}`, `{id, source, prompt, response}` or `{id, source, messages}`
(a chat; the collator renders it with the tokenizer's chat template). Accepted records, the
first that matches wins:

* `messages`: a list of `{role, content}` with at least one `assistant` turn; the
  supervised span is the LAST assistant turn (later turns are dropped).
* `prompt` + `response` (or `completion`).
* `instruction` + `output` (+ optional `input`), rendered with the Alpaca template below.
* `question` + `choices` + `answer` (MMLU-style multiple choice; `answer` an index, a letter
  or the text of a choice): prompt = the question, lettered choices and `Answer:`, response
  = ` <letter>`. Such rows also keep `choices`/`answer` for option-likelihood accuracy.
* `text`: plain text, every token supervised.

`data.fields` renames columns first (`{prompt: question, response: answer}`), and
`source` comes from `data.source_field` (default `source`), else the file stem.
"""

from __future__ import annotations

import string

from fwsel.errors import DataError

ALPACA = "### Instruction:\n{instruction}\n\n{input}### Response:\n"  # {input} = "### Input:\n...\n\n" or ""
LETTERS = string.ascii_uppercase
FORMATS_HELP = ("text | prompt+response | instruction+output(+input) | messages | question+choices+answer")


def _str(obj: dict, key: str, where: str) -> str:
    v = obj[key]
    if not isinstance(v, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(v).__name__}")
    return v


def mc_prompt(question: str, choices: list[str]) -> str:
    lines = [question.strip()] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)]
    return "\n".join(lines) + "\nAnswer:"


def mc_option(i: int) -> str:
    """The continuation scored for option i (its letter, as in the MMLU harness)."""
    return f" {LETTERS[i]}"


def _answer_index(ans, choices: list[str], where: str) -> int:
    if isinstance(ans, bool):
        ans = None
    if isinstance(ans, int) and 0 <= ans < len(choices):
        return ans
    if isinstance(ans, str):
        a = ans.strip()
        if len(a) == 1 and a.upper() in LETTERS[: len(choices)]:
            return LETTERS.index(a.upper())
        if a.isdigit() and int(a) < len(choices):
            return int(a)
        if a in choices:
            return choices.index(a)
    raise DataError(f"{where}: 'answer' must be an index, a letter or a choice's text among "
                    f"{len(choices)} choices, got {ans!r}")


def _messages(obj: dict, where: str) -> list[dict]:
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for j, m in enumerate(msgs):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: messages[{j}] must be an object with string 'role' and 'content'")
        out.append({"role": m["role"], "content": m["content"]})
    last = max((j for j, m in enumerate(out) if m["role"] == "assistant"), default=None)
    if last is None:
        raise DataError(f"{where}: 'messages' has no assistant turn to train on")
    return out[: last + 1]


def to_row(obj, where: str, source_field: str = "source", default_source: str = "data", fields=None) -> dict:
    """Normalise one record; raises DataError naming `where` (file:line) for anything it cannot use."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected an object with named fields, got {type(obj).__name__}")
    if fields:
        missing = [col for col in fields.values() if col not in obj]
        if missing:
            raise DataError(f"{where}: data.fields names columns {missing} that the row lacks (keys {sorted(obj)})")
        obj = {**obj, **{canon: obj[col] for canon, col in fields.items()}}
    src = obj.get(source_field)
    row = {"id": where, "source": str(src) if src not in (None, "") else default_source}
    if "messages" in obj:
        row["messages"] = _messages(obj, where)
    elif "prompt" in obj and ("response" in obj or "completion" in obj):
        row["prompt"] = _str(obj, "prompt", where)
        row["response"] = _str(obj, "response" if "response" in obj else "completion", where)
    elif "instruction" in obj and "output" in obj:
        inp = _str(obj, "input", where) if obj.get("input") is not None else ""
        row["prompt"] = ALPACA.format(instruction=_str(obj, "instruction", where),
                                      input=f"### Input:\n{inp}\n\n" if inp.strip() else "")
        row["response"] = _str(obj, "output", where)
    elif "question" in obj and "choices" in obj and "answer" in obj:
        choices = obj["choices"]
        if not (isinstance(choices, (list, tuple)) and 2 <= len(choices) <= len(LETTERS)
                and all(isinstance(c, str) for c in choices)):
            raise DataError(f"{where}: 'choices' must be a list of 2 to 26 strings")
        choices = list(choices)
        ans = _answer_index(obj["answer"], choices, where)
        row.update(prompt=mc_prompt(_str(obj, "question", where), choices), response=mc_option(ans),
                   choices=choices, answer=ans)
    elif "text" in obj:
        row["text"] = _str(obj, "text", where)
    else:
        raise DataError(f"{where}: no known format (a row needs {FORMATS_HELP}); got keys {sorted(obj)}")
    return row


def plain_chat(messages: list[dict]) -> tuple[str, str]:
    """The documented fallback for tokenizers without a chat template: (prompt, response).

    Each earlier turn is `<role>: <content>` on its own line; the prompt ends with
    `assistant: ` and the response is the last assistant turn's content.
    """
    head = "".join(f"{m['role']}: {m['content']}\n" for m in messages[:-1])
    return head + "assistant: ", messages[-1]["content"]
