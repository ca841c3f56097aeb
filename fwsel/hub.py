"""Pretrained causal LMs by hub name or local dir, and saving the trained result.

Loading never hangs and never prints a 60-line traceback: a name that is not a local dir is
checked first with ONE hub request (no retries; `HF_HUB_OFFLINE=1` skips it and looks in
the cache only). A name that cannot be loaded raises `ConfigError` with one line saying
what was tried and how to point at a local copy. Without the check, transformers retries
each file for ~47 s before failing.
"""

from __future__ import annotations

import logging
import os
import re
import shutil

import torch

from fwsel.errors import ConfigError

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9_][\w.-]*(/[\w.-]+)?$")


def local_hint(key: str, name: str, repo_type: str = "model") -> str:
    """How to point at a local copy (and make one, for hub names)."""
    hint = f"point at a local copy with {key}=/path/to/dir"
    if name and HUB_ID.match(name):
        kind = " --repo-type dataset" if repo_type == "dataset" else ""
        hint += f" (made where there is network with `hf download {name}{kind} --local-dir DIR`)"
    return hint


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def looks_local(name: str) -> bool:
    """A path, not a hub id (`org/name` or `name`)."""
    return not HUB_ID.match(name) or os.path.exists(name)


def offline() -> bool:
    from huggingface_hub import constants

    if hasattr(constants, "is_offline_mode"):
        return bool(constants.is_offline_mode())
    return bool(constants.HF_HUB_OFFLINE)


def cached(name: str, repo_type: str, revision=None) -> bool:
    """Whether the HF cache holds a snapshot of the repo (config.json for models)."""
    from huggingface_hub import constants, try_to_load_from_cache

    if repo_type == "model":
        return isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str)
    folder = os.path.join(constants.HF_HUB_CACHE, f"datasets--{name.replace('/', '--')}")
    return os.path.isdir(os.path.join(folder, "snapshots"))


def check_source(name, key: str, what: str, repo_type: str = "model", revision=None) -> bool:
    """Fails fast with one line if `name` cannot be loaded. Returns True when loading must stay local.

    A local dir: local. Offline: local, and it must be cached. Online: one `repo_info` request
    (no retries); unreachable falls back to the cache, a missing or gated repo is an error.
    """
    hint = local_hint(key, name, repo_type)
    if not name or not isinstance(name, str):
        raise ConfigError(f"{key} is required: a hub name or a local dir")
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        return True
    if looks_local(name):
        why = "a file, not a directory" if os.path.exists(path) else "no such directory"
        extra = " (or read files with data=jsonl data.files=...)" if repo_type == "dataset" else ""
        raise ConfigError(f"cannot load {what} {name!r}: {why}; {hint}{extra}")
    if offline():
        if cached(name, repo_type, revision):
            return True
        raise ConfigError(f"cannot load {what} {name!r}: HF_HUB_OFFLINE is set and it is not in the local "
                          f"HF cache; {hint}")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        HfApi().repo_info(name, repo_type=repo_type, revision=revision, timeout=10)
        return False
    except GatedRepoError:
        raise ConfigError(f"cannot load {what} {name!r}: it is gated (accept its license on the hub and log in "
                          f"with `hf auth login`), or {hint}") from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise ConfigError(f"cannot load {what} {name!r}: not found on the hub (or private: log in with "
                          f"`hf auth login`) [{_first_line(e)}]; {hint}") from None
    except Exception as e:  # noqa: BLE001 - httpx/requests/OS errors: the hub is unreachable
        if cached(name, repo_type, revision):
            log.warning("the hub is unreachable (%s): using the cached copy of %s", _first_line(e), name)
            return True
        raise ConfigError(f"cannot load {what} {name!r}: the hub is unreachable ({_first_line(e)}) and it is "
                          f"not in the local HF cache; {hint}") from None


def _dtype_kw(dtype: torch.dtype) -> dict:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def set_pad_token(tokenizer) -> None:
    """Tokenizers without a pad token pad with EOS (padding is masked out of attention and loss)."""
    if tokenizer.pad_token_id is not None:
        return
    for name in ("eos_token", "unk_token"):
        tok = getattr(tokenizer, name, None)
        if tok is not None:
            tokenizer.pad_token = tok
            log.info("the tokenizer has no pad token: padding with its %s %r (masked out of attention and loss)",
                     name, tok)
            return
    log.info("the tokenizer has no pad, eos or unk token: padding with id 0 (masked out of attention and loss)")


def load_pretrained(mcfg, dtype: torch.dtype):
    """(model, tokenizer) for `model.name_or_path` (and `model.tokenizer`, default the same)."""
    name = mcfg.get("name_or_path")
    revision = mcfg.get("revision")
    local = check_source(name, "model.name_or_path", "model", revision=revision)
    tok_name = mcfg.get("tokenizer") or name
    tok_local = local if tok_name == name else check_source(tok_name, "model.tokenizer", "tokenizer")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    common = {"revision": revision, "trust_remote_code": bool(mcfg.get("trust_remote_code", False))}
    try:
        tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(tok_name), local_files_only=tok_local, **common)
    except Exception as e:  # noqa: BLE001 - any failure here is "this is not a loadable tokenizer"
        raise ConfigError(f"cannot load the tokenizer from {tok_name!r} ({_first_line(e)}); set model.tokenizer="
                          f"/path/to/dir, or {local_hint('model.name_or_path', tok_name)}") from None
    kw = {**common, **_dtype_kw(dtype)}
    if mcfg.get("attn_implementation"):
        kw["attn_implementation"] = mcfg.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(os.path.expanduser(name), local_files_only=local, **kw)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"cannot load a causal LM from {name!r} ({_first_line(e)}); "
                          f"{local_hint('model.name_or_path', name)}") from None
    set_pad_token(tokenizer)
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    log.info("loaded %s (%s, %.1fM parameters, max_position_embeddings=%s)", name, type(model).__name__,
             sum(p.numel() for p in model.parameters()) / 1e6, getattr(model.config, "max_position_embeddings", None))
    return model, tokenizer


def save_model(model, tokenizer, out_dir: str) -> str:
    """The LoRA adapter (peft `save_pretrained`) or the full model, plus the tokenizer, written
    to `out_dir.tmp` then renamed, so `out_dir` is always complete."""
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    what = "LoRA adapter" if hasattr(model, "peft_config") else "full model"
    log.info("saved the %s and tokenizer to %s", what, out_dir)
    return out_dir
