"""Checks that run before training starts: one line naming the key and what is allowed.

The one validation layer: the selector's own checks (its constructor) surface here as the same
one-line ConfigError, before any model or data is built.
"""

from __future__ import annotations

from fwsel.errors import ConfigError
from fwsel.schedule import SCHEDULES

MODEL_DTYPES = {"tiny": ("fp32", "fp64"), "hf": ("auto", "bf16", "fp16", "fp32", "fp64")}  # model.kind -> dtypes


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _int(v, minimum: int = 1, null: bool = False) -> bool:
    """`v` is an integer >= `minimum` (a bool is not), or None where `null` allows it."""
    return (null and v is None) or (isinstance(v, int) and not isinstance(v, bool) and v >= minimum)


def validate(cfg) -> None:
    _check(isinstance(cfg.budget, (int, float)) and 0 < float(cfg.budget) <= 1,
           f"budget must be in (0, 1], got {cfg.budget!r}")
    for key in ("batch_size", "steps", "eval_every", "checkpoint_keep", "max_bad_steps"):
        v = cfg[key]
        if key == "steps" and v is None:  # until the data is used up (fwsel.data.total_steps)
            continue
        _check(_int(v), f"{key} must be an integer >= 1, got {v!r}")
    epochs = cfg.data.get("epochs", 1)
    _check(_int(epochs), f"data.epochs must be an integer >= 1, got {epochs!r}")
    _check(_int(cfg.checkpoint_every, null=True),
           f"checkpoint_every must be null or an integer >= 1, got {cfg.checkpoint_every!r}")
    _check(cfg.target.batch_size >= 1, f"target.batch_size must be >= 1, got {cfg.target.batch_size!r}")
    validate_engine(cfg.engine)
    build_selector(cfg.selector)
    keep = cfg.selector.get("prefilter_keep")  # read by the loop (Trainer.shortlist), not by the selector
    _check(keep is None or (isinstance(keep, (int, float)) and 0 < keep <= 1),
           f"selector.prefilter_keep must be null or a fraction in (0, 1], got {keep!r}")
    _check(cfg.optim.schedule in SCHEDULES,
           f"optim.schedule must be one of {'|'.join(SCHEDULES)}, got {cfg.optim.schedule!r}")
    _check(cfg.optim.max_grad_norm is None or float(cfg.optim.max_grad_norm) > 0,
           f"optim.max_grad_norm must be null or > 0, got {cfg.optim.max_grad_norm!r}")
    allowed = MODEL_DTYPES
    _check(cfg.model.kind in allowed, f"model.kind must be one of tiny|hf, got {cfg.model.kind!r}")
    _check(cfg.model.dtype in allowed[cfg.model.kind],
           f"model.dtype must be one of {'|'.join(allowed[cfg.model.kind])}, got {cfg.model.dtype!r}")
    _check(cfg.model.kind != "hf" or bool(cfg.model.get("name_or_path")),
           "model.name_or_path is required for model.kind=hf: a hub name or a local dir")
    _check(cfg.data.kind in ("synthetic", "jsonl", "hf"),
           f"data.kind must be one of synthetic|jsonl|hf, got {cfg.data.kind!r}")
    _check(cfg.data.get("on_error", "raise") in ("raise", "skip"),
           f"data.on_error must be raise|skip, got {cfg.data.get('on_error')!r}")
    _check(cfg.target.get("from_stream") is None or int(cfg.target.from_stream) >= 2,
           f"target.from_stream must be null or an integer >= 2, got {cfg.target.get('from_stream')!r}")
    _check(cfg.device == "auto" or str(cfg.device).split(":")[0] in ("cpu", "cuda", "mps"),
           f"device must be auto|cpu|cuda|cuda:N, got {cfg.device!r}")
    if str(cfg.device).startswith("cuda"):
        import torch

        _check(torch.cuda.is_available(), f"device={cfg.device} but this torch build sees no CUDA device "
                                          f"(torch {torch.__version__}); use device=auto or device=cpu")
    _check(str(cfg.progress).lower() in ("auto", "true", "false"),
           f"progress must be auto|true|false, got {cfg.progress!r}")


def validate_engine(eng) -> None:
    """The `engine:` group (fwsel.grads.dist.build_engine reads exactly these keys)."""
    from fwsel.grads.engine import GHOST_B
    from fwsel.grads.ghost import PATHS
    from fwsel.grads.project import KINDS

    _check(eng.grad_path in PATHS, f"engine.grad_path must be one of {'|'.join(PATHS)}, got {eng.grad_path!r}")
    _check(eng.get("ghost_b", "exact") in GHOST_B,
           f"engine.ghost_b must be one of {'|'.join(GHOST_B)}, got {eng.get('ghost_b')!r}")
    _check(_int(eng.projection_dim, null=True),
           f"engine.projection_dim must be null or an integer >= 1, got {eng.projection_dim!r}")
    _check(eng.projection in KINDS, f"engine.projection must be one of {'|'.join(KINDS)}, got {eng.projection!r}")
    _check(eng.projection_dim is None or eng.grad_path != "ghost",
           "engine.grad_path=ghost does not combine with engine.projection_dim (a sketch needs materialised rows)")
    _check(_int(eng.micro_batch_size, null=True),
           f"engine.micro_batch_size must be null or an integer >= 1, got {eng.micro_batch_size!r}")
    _check(_int(eng.loss_chunk_tokens),
           f"engine.loss_chunk_tokens must be an integer >= 1, got {eng.loss_chunk_tokens!r}")


def build_selector(scfg):
    """The selector of the `selector:` group; a value its constructor refuses is a ConfigError."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(scfg, _convert_="all")
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, ValueError):
            raise ConfigError(str(cause)) from None
        if isinstance(cause, TypeError):  # e.g. a missing required key
            raise ConfigError(f"selector ({scfg.get('_target_')}): {cause}") from None
        raise
