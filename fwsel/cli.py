"""`fwsel <command> ...`: a thin dispatcher, so `fwsel train` keeps all of Hydra's CLI (-m, --cfg,
tab completion).

Everything here runs before torch is imported: `--help`, `--version`, `compare` and
`export-selection` never load it, and `train` first sets the OpenMP environment (fwsel.threads),
rewrites the argv (torchrun, `resume=`) and refuses keys no config declares.
"""

from __future__ import annotations

import logging
import os
import re
import sys

USAGE = """usage: fwsel <command> [args]

commands:
  train              fine-tune online with data selection (`fwsel train --help`: groups, keys, selectors)
  compare            table and curves for sweep or run dirs (`fwsel compare --help`)
  export-selection   the selected rows of a run as JSONL (`fwsel export-selection --help`)

options:
  --version          print fwsel's version
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if argv[0] in ("-V", "--version"):
        from fwsel import __version__

        print(f"fwsel {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        return train(rest)
    if cmd == "compare":
        from fwsel.compare import main as compare_main

        return compare_main(rest)
    if cmd == "export-selection":
        from fwsel.export import main as export_main

        return export_main(rest)
    print(f"fwsel: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 1


def train(rest: list[str]) -> int:
    """`fwsel train ...`: check and rewrite the argv, then hand it to Hydra."""
    from fwsel.errors import FwselError

    if "-h" in rest or "--help" in rest:
        from fwsel.confdoc import help_text

        print(help_text(rest))
        return 0
    from fwsel import threads

    try:
        threads.configure(rest)  # before torch loads: OpenMP reads its environment once
        rest = resume_argv(run_dir_args(rest))  # torchrun: one run dir for all ranks
        check_keys(rest)
        warn_unswept(rest)
        if env_world()[0] == 0:  # rank 0 alone checks (the others would see its files)
            check_output_dir(rest)
        rest = rank_args(rest)
    except FwselError as e:
        print(f"fwsel train: {e}", file=sys.stderr)
        return 1
    from fwsel import distributed
    from fwsel.train import FAILED_JOBS
    from fwsel.train import main as train_main

    sys.argv = ["fwsel", *rest]
    FAILED_JOBS.clear()  # one list per command (tests run several in one process)
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
    if FAILED_JOBS:  # a sweep ran its other jobs (and the compare); the exit code still says it failed
        print(f"fwsel train: {len(FAILED_JOBS)} sweep job(s) failed:", *FAILED_JOBS, sep="\n  ", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------- overrides
def override_key(override: str) -> str:
    """`+a.b=1`, `~a.b`, `++a.b=1` -> `a.b` (the one parser of an override's key)."""
    return override.split("=", 1)[0].lstrip("+~")


def overrides(args: list[str]) -> list[str]:
    """The KEY=VALUE arguments (flags such as -m and --cfg job's `job` aside)."""
    return [a for a in args if not a.startswith("-") and "=" in a]


def override_values(args: list[str], key: str) -> list[str]:
    """The values given to `key` (any of `key=`, `+key=`, `++key=`), in order, outer quotes off."""
    return [a.split("=", 1)[1].strip("'\"") for a in overrides(args) if override_key(a) == key]


def _quote(path: str) -> str:
    """A path as an override value (Hydra's parser needs quotes around spaces, '=' and the like)."""
    return path if re.fullmatch(r"[\w/.:@+-]+", path) else "'" + path.replace("'", "\\'") + "'"


def check_keys(args: list[str]) -> None:
    """Refuse, in one line with the nearest declared key, an override no config declares
    (Hydra would only hint `+lr=...`, which then runs with `optim.lr` unchanged)."""
    from fwsel import confdoc
    from fwsel.errors import ConfigError

    given = [override_key(a) for a in overrides(args) if not a.startswith("~")]
    if not given:
        return
    conf, extra = confdoc.conf_dir(), confdoc.searchpath(args)
    keys, groups = confdoc.declared(conf, extra), confdoc.groups(conf, extra)
    for key in given:
        msg = confdoc.unknown(key, keys, groups)
        if msg:
            raise ConfigError(msg)
    check_selector_keys(args, [conf, *extra])


def check_selector_keys(args: list[str], dirs) -> None:
    """A `selector.KEY` (or `+selector.KEY`) must be a key of the chosen selector: Hydra would print a
    multi-line error for a missing one, or (with `+`) pass it on to a selector that ignores it."""
    from fwsel import confdoc
    from fwsel.errors import ConfigError

    given = [a for a in overrides(args) if not a.startswith("~") and override_key(a).startswith("selector.")]
    chosen = override_values(args, "selector")
    options = chosen[-1].split(",") if chosen else [confdoc.defaults(dirs[0]).get("selector", "")]
    if not given or any(not o or "(" in o for o in options):  # choice(...) and the like: Hydra checks those
        return
    own = {o: confdoc.option_keys("selector", o, dirs) for o in options}
    if any(k is None for k in own.values()):  # an option not found here: Hydra checks it
        return
    for arg in given:
        key = override_key(arg).split(".")[1]
        lack = [o for o in options if key not in own[o]]
        if not lack:
            continue
        if len(lack) == len(options):
            raise ConfigError(f"selector.{key} is not a key of selector={','.join(options)} "
                              f"(keys of {lack[0]}: {', '.join(sorted(own[lack[0]] - {'_target_'}))})")
        has = [o for o in options if o not in lack]
        raise ConfigError(f"selector.{key} is a key of {','.join(has)} but not of {','.join(lack)}: sweep them "
                          f"separately into one dir (-m selector={','.join(has)} {arg} hydra.sweep.dir=D, then "
                          f"-m selector={','.join(lack)} hydra.sweep.dir=D); `fwsel compare D` puts them in one table")


def is_multirun(args: list[str]) -> bool:
    return "-m" in args or "--multirun" in args


def warn_unswept(args: list[str]) -> None:
    """An experiment that declares a sweep grid, run without -m, trains one job: say so in one line."""
    from fwsel import confdoc

    chosen = override_values(args, "experiment")
    path = confdoc.conf_dir() / "experiment" / f"{chosen[-1] if chosen else ''}.yaml"
    if chosen and not is_multirun(args) and path.is_file() and "sweeper:" in path.read_text(encoding="utf-8"):
        print(f"fwsel train: warning: experiment={chosen[-1]} is a sweep grid, but without -m only one job runs "
              f"with the config's own values; add -m to run the grid", file=sys.stderr)


def resume_argv(rest: list[str]) -> list[str]:
    """`resume=<dir> [extra ...]` -> that run's saved overrides, the extras, resume= and hydra.run.dir.

    Extras that would change the curve are refused, naming the keys; tracker, progress,
    checkpointing and logging overrides are allowed.
    """
    from omegaconf import OmegaConf

    from fwsel.errors import FwselError

    given = override_values(rest, "resume")
    if not given:
        return rest
    from fwsel.checkpoint import RESUME_SAFE_HYDRA  # torch: the threads are set by now
    from fwsel.outputs import RESUME_SAFE

    run_dir = os.path.abspath(os.path.expanduser(given[-1]))
    flags = [a for a in rest if a.startswith("-") or "=" not in a]
    if is_multirun(flags):
        raise FwselError("resume= continues one run; to resume a sweep re-run its command with the same "
                         "hydra.sweep.dir")
    path = os.path.join(run_dir, ".hydra", "overrides.yaml")
    if not os.path.isfile(path):
        raise FwselError(f"resume={run_dir}: not a fwsel run dir (no .hydra/overrides.yaml)")
    saved = [str(o) for o in OmegaConf.to_container(OmegaConf.load(path)) if override_key(str(o)) != "resume"]
    extras = [a for a in rest if a not in flags and override_key(a) != "resume"]
    safe = lambda k: any(k == s or k.startswith(s + ".") for s in (*RESUME_SAFE, *RESUME_SAFE_HYDRA))  # noqa: E731
    bad = sorted({override_key(a) for a in extras if not safe(override_key(a)) and a not in saved})
    if bad:
        raise FwselError(f"resume={run_dir}: refusing overrides that would change the run: {', '.join(bad)} "
                         f"(allowed with resume=: {', '.join(k for k in RESUME_SAFE if k != 'resume')}, "
                         f"hydra logging); "
                         f"start a new run to change them")
    over = {override_key(a) for a in extras}
    return [*[o for o in saved if override_key(o) not in over], *extras, f"resume={_quote(run_dir)}",
            f"hydra.run.dir={_quote(run_dir)}", *flags]


def check_output_dir(args: list[str]) -> None:
    """Fail in one line when the run (or sweep) dir cannot be created, or already holds a run,
    before Hydra writes into it."""
    from fwsel.errors import FwselError

    multirun = is_multirun(args)
    vals = override_values(args, "hydra.sweep.dir" if multirun else "hydra.run.dir")
    target = (vals[-1] if vals else "multirun" if multirun else "outputs").split("${", 1)[0] or "."
    probe = os.path.abspath(os.path.expanduser(target))
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise FwselError(f"cannot create the output dir {target}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise FwselError(f"cannot create the output dir {target}: {probe} is not writable")
    metrics = os.path.join(probe, "metrics.jsonl")
    if not multirun and not any(override_key(a) == "resume" for a in args) and os.path.isfile(metrics) \
            and os.path.getsize(metrics) > 0:  # never append to (or rewrite the .hydra/ of) another run
        raise FwselError(f"{probe} already holds a run: continue it with `fwsel train resume={probe}` "
                         f"or choose a new hydra.run.dir")


# ---------------------------------------------------------------- the console's log handler
def console_handler(**rich_kwargs):
    """rich's handler on a terminal; off one (a pipe, a file, a job scheduler's log) one plain line
    per record with time and level, so a line is never wrapped at 80 columns and greps whole."""
    if sys.stdout.isatty():  # rich's console writes to stdout
        from rich.logging import RichHandler

        return RichHandler(**rich_kwargs)
    return PlainHandler(sys.stdout)


class PlainHandler(logging.StreamHandler):
    def format(self, record) -> str:
        import time

        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        return f"[{stamp}] {record.levelname:<7} {super().format(record)}"


# ---------------------------------------------------------------- the command line under torchrun
def env_world(env=os.environ) -> tuple[int, int]:
    """(rank, world size) as torchrun sets them; (0, 1) outside torchrun."""
    return int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1"))


def run_dir_args(args: list[str], env=os.environ) -> list[str]:
    """Under torchrun, one run dir for every rank: Hydra's default `${now:...}` differs per process.

    Kept: an explicit `hydra.run.dir=` (`hydra.sweep.dir=` with -m) or `resume=`. Else the dir
    is `outputs/torchrun/<run id>` (`multirun/torchrun/<run id>`) from TORCHELASTIC_RUN_ID
    (torchrun's --rdzv-id; --standalone makes a fresh one). When torchrun restarts a failed
    group (--max-restarts), that dir already holds the run: it is resumed.
    """
    from fwsel.errors import FwselError

    rank, world = env_world(env)
    if world <= 1:
        return args
    multirun = is_multirun(args)
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    if any(not a.startswith("-") and override_key(a) in (key, "resume") for a in args):
        return args
    run_id = env.get("TORCHELASTIC_RUN_ID", "none")
    if run_id in ("", "none"):
        raise FwselError(f"under torchrun ({world} processes) every rank must write into one dir: give {key}=<dir>, "
                         f"or start torchrun with --rdzv-id=<name> (or --standalone) to derive it from the run id")
    path = os.path.join("multirun" if multirun else "outputs", "torchrun", run_id)
    restarted = int(env.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    if restarted and not multirun and os.path.isfile(os.path.join(path, ".hydra", "overrides.yaml")):
        return [*args, f"resume={path}"]
    return [*args, f"{key}={path}"]


def rank_args(args: list[str], env=os.environ) -> list[str]:
    """Ranks > 0 write nothing: no .hydra/ dir, console-only logging (warnings and errors)."""
    rank, world = env_world(env)
    if world <= 1 or rank == 0:
        return args
    extra = ["hydra.output_subdir=null"]
    if not any(override_key(a) == "hydra/job_logging" for a in args):
        extra.append("hydra/job_logging=rich_console")
    if is_multirun(args):
        extra.append("~hydra.callbacks.compare")  # rank 0 writes the sweep's table and curves
    return [*args, *extra]


if __name__ == "__main__":
    sys.exit(main())
