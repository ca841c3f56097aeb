"""`fwsel <command> ...`: a thin dispatcher, so `fwsel train` keeps all of Hydra's CLI (-m, --cfg,
--help, tab completion)."""

from __future__ import annotations

import os
import re
import sys

USAGE = """usage: fwsel <command> [args]

commands:
  train              fine-tune online with data selection (Hydra: `fwsel train --help`)
  compare            table and curves for one or more sweep/run dirs (`fwsel compare --help`)
  export-selection   the selected rows of a run as JSONL (`fwsel export-selection --help`)
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        from fwsel import distributed
        from fwsel.errors import FwselError

        try:
            rest = resume_argv(distributed.run_dir_args(rest))  # torchrun: one run dir for all ranks
            if distributed.env_world()[0] == 0:  # rank 0 alone checks (the others would see its files)
                check_output_dir(rest)
            rest = distributed.rank_args(rest)
        except FwselError as e:
            print(f"fwsel train: {e}", file=sys.stderr)
            return 1
        from fwsel.train import main as train_main

        sys.argv = ["fwsel", *rest]
        distributed.init()  # joins torchrun's process group; nothing in one process
        ok = False
        try:
            train_main()
            ok = True
        except SystemExit as e:
            ok = e.code in (0, None)
            raise
        finally:
            distributed.shutdown(ok)
        return 0
    if cmd == "compare":
        from fwsel.compare import main as compare_main

        return compare_main(rest)
    if cmd == "export-selection":
        from fwsel.export import main as export_main

        return export_main(rest)
    print(f"fwsel: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 1


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _quote(path: str) -> str:
    """A path as an override value (Hydra's parser needs quotes around spaces, '=' and the like)."""
    return path if re.fullmatch(r"[\w/.:@+-]+", path) else "'" + path.replace("'", "\\'") + "'"


def resume_argv(rest: list[str]) -> list[str]:
    """`resume=<dir> [extra ...]` -> that run's saved overrides, the extras, resume= and hydra.run.dir.

    Extras that would change the curve are refused, naming the keys; tracker, progress,
    checkpointing and logging overrides are allowed.
    """
    from omegaconf import OmegaConf

    from fwsel.checkpoint import RESUME_SAFE, RESUME_SAFE_HYDRA
    from fwsel.errors import FwselError

    given = [a for a in rest if not a.startswith("-") and _key(a) == "resume"]
    if not given:
        return rest
    run_dir = os.path.abspath(os.path.expanduser(given[-1].split("=", 1)[1].strip("'\"")))
    flags = [a for a in rest if a.startswith("-") or "=" not in a]
    if "-m" in flags or "--multirun" in flags:
        raise FwselError("resume= continues one run; to resume a sweep re-run its command with the same hydra.sweep.dir")
    path = os.path.join(run_dir, ".hydra", "overrides.yaml")
    if not os.path.isfile(path):
        raise FwselError(f"resume={run_dir}: not a fwsel run dir (no .hydra/overrides.yaml)")
    saved = [str(o) for o in OmegaConf.to_container(OmegaConf.load(path)) if _key(str(o)) != "resume"]
    extras = [a for a in rest if a not in flags and a not in given]
    safe = lambda k: any(k == s or k.startswith(s + ".") for s in (*RESUME_SAFE, *RESUME_SAFE_HYDRA))  # noqa: E731
    bad = sorted({_key(a) for a in extras if not safe(_key(a)) and a not in saved})
    if bad:
        raise FwselError(f"resume={run_dir}: refusing overrides that would change the run: {', '.join(bad)} "
                         f"(allowed with resume=: {', '.join(k for k in RESUME_SAFE if k != 'resume')}, hydra logging); "
                         f"start a new run to change them")
    over = {_key(a) for a in extras}
    return [*[o for o in saved if _key(o) not in over], *extras, f"resume={_quote(run_dir)}",
            f"hydra.run.dir={_quote(run_dir)}", *flags]


def check_output_dir(args: list[str]) -> None:
    """Fail in one line when the run (or sweep) dir cannot be created, or already holds a run,
    before Hydra writes into it."""
    from fwsel.errors import FwselError

    multirun = "-m" in args or "--multirun" in args
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    vals = [a.split("=", 1)[1].strip("'\"") for a in args if not a.startswith("-") and _key(a) == key]
    target = (vals[-1] if vals else "multirun" if multirun else "outputs").split("${", 1)[0] or "."
    probe = os.path.abspath(os.path.expanduser(target))
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise FwselError(f"cannot create the output dir {target}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise FwselError(f"cannot create the output dir {target}: {probe} is not writable")
    metrics = os.path.join(probe, "metrics.jsonl")
    if not multirun and not any(_key(a) == "resume" for a in args) and os.path.isfile(metrics) \
            and os.path.getsize(metrics) > 0:  # never append to (or rewrite the .hydra/ of) another run
        raise FwselError(f"{probe} already holds a run: continue it with `fwsel train resume={probe}` "
                         f"or choose a new hydra.run.dir")


if __name__ == "__main__":
    sys.exit(main())
