"""The config files read as documentation: every key with its one-line comment.

Used before Hydra (and torch) load: `fwsel train --help` prints the keys and what each
group option does, and an override naming a key no config declares is refused with the
nearest one. Read from the YAML text (the comments are the documentation), no import of
Hydra or omegaconf.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path

_LINE = re.compile(r"^(?P<ind>\s*)(?P<key>[A-Za-z_][\w.-]*):(?P<val>[^#]*?)\s*(?:#\s?(?P<doc>.*))?$")
FREE_FORM = "{}"  # a key declared as an empty mapping takes any sub-key (e.g. data.fields)


@dataclass
class Key:
    path: str
    value: str
    doc: str


def conf_dir() -> Path:
    import fwsel.conf  # conf/ ships inside the package (editable installs map it)

    return Path(fwsel.conf.__file__).resolve().parent


def parse(path: Path, prefix: str = "") -> list[Key]:
    """Dotted keys of one YAML file with their values and comments (lists and hydra: skipped)."""
    out, stack = [], []  # stack of (indent, key)
    for line in path.read_text(encoding="utf-8").splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        ind = len(m["ind"])
        while stack and stack[-1][0] >= ind:
            stack.pop()
        parts = [k for _, k in stack] + [m["key"]]
        stack.append((ind, m["key"]))
        if parts[0] in ("defaults", "hydra"):
            continue
        out.append(Key(prefix + ".".join(parts), m["val"].strip(), (m["doc"] or "").strip()))
    return out


def header(path: Path) -> str:
    """The file's first comment line (what the option does)."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#") and "@package" not in line:
            return line.lstrip("# ").strip()
    return ""


def searchpath(args: list[str]) -> list[Path]:
    """The existing `file://` dirs of a `hydra.searchpath=[...]` override (user-added options live there)."""
    from fwsel.cli import override_values

    vals = override_values(args, "hydra.searchpath")
    items = re.split(r"\s*,\s*", vals[-1].strip().strip("[]")) if vals else []
    dirs = [Path(i.strip("'\"")[len("file://"):]).expanduser() for i in items if i.strip("'\"").startswith("file://")]
    return [d for d in dirs if d.is_dir()]


def groups(conf: Path, extra: list[Path] = ()) -> dict[str, list[str]]:
    """Config group -> its options (hydra's own groups aside), fwsel's and those under `extra` dirs."""
    out: dict[str, set[str]] = {}
    for root in (conf, *extra):
        for d in sorted(root.iterdir()):
            if d.is_dir() and d.name != "hydra" and any(d.glob("*.yaml")):
                out.setdefault(d.name, set()).update(p.stem for p in d.glob("*.yaml"))
    return {g: sorted(o) for g, o in sorted(out.items())}


def option_file(group: str, option: str, dirs: list[Path]) -> Path | None:
    """`<dir>/<group>/<option>.yaml` in the first of `dirs` that has it."""
    return next((d / group / f"{option}.yaml" for d in dirs if (d / group / f"{option}.yaml").is_file()), None)


def option_keys(group: str, option: str, dirs: list[Path]) -> set[str] | None:
    """The keys an option of a group declares (those of the options in its `defaults` too); None if not found."""
    path = option_file(group, option, dirs)
    if path is None:
        return None
    keys = {k.path.split(".", 1)[0] for k in parse(path)}
    for base in re.findall(r"^\s+-\s+(\w+)\s*$", path.read_text(encoding="utf-8"), flags=re.M):
        if base != "_self_":
            keys |= option_keys(group, base, dirs) or set()
    return keys


def defaults(conf: Path) -> dict[str, str]:
    """group -> default option, from train.yaml's defaults list."""
    out = {}
    for line in (conf / "train.yaml").read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\s+-\s+(\w+):\s*(\S+)", line)
        if m and m[2] != "null":
            out[m[1]] = m[2]
    return out


def is_global(path: Path) -> bool:
    return "@package _global_" in path.read_text(encoding="utf-8")


def declared(conf: Path | None = None, extra: list[Path] = ()) -> list[Key]:
    """Every key any config declares: train.yaml, each group option (prefixed), global presets."""
    conf = conf or conf_dir()
    keys = parse(conf / "train.yaml")
    for group, options in groups(conf, extra).items():
        for opt in options:
            path = option_file(group, opt, [conf, *extra])
            keys += parse(path, "" if is_global(path) else f"{group}.")
    return keys


def unknown(key: str, keys: list[Key], groups_: dict) -> str | None:
    """None when `key` is declared (or under a free-form mapping, or Hydra's); else the message."""
    if key.startswith(("hydra.", "hydra/")) or key == "hydra" or key in groups_:
        return None
    paths = {k.path: k for k in keys}
    if key in paths:
        return None
    parent = key.rsplit(".", 1)[0] if "." in key else None
    while parent:
        if parent in paths and paths[parent].value == FREE_FORM:
            return None
        parent = parent.rsplit(".", 1)[0] if "." in parent else None
    last = key.rsplit(".", 1)[-1]
    same_leaf = sorted(p for p in paths if p.rsplit(".", 1)[-1] == last)
    near = same_leaf or difflib.get_close_matches(key, list(paths), n=1, cutoff=0.6)
    hint = f": did you mean {near[0]}?" if near else " (`fwsel train --help` lists the keys)"
    return f"unknown key {key!r} (no config declares it){hint}"


def _group_choices(args: list[str], conf: Path, extra: list[Path] = ()) -> dict[str, str]:
    from fwsel.cli import override_key, overrides

    chosen, known = defaults(conf), groups(conf, extra)
    for a in overrides(args):
        if override_key(a) in known:
            chosen[override_key(a)] = a.split("=", 1)[1]
    return chosen


def help_text(args: list[str] | None = None, conf: Path | None = None) -> str:
    """`fwsel train --help`: groups with what each option does, then the keys of the chosen options."""
    conf = conf or conf_dir()
    dirs = [conf, *searchpath(args or [])]
    chosen = _group_choices(args or [], conf, dirs[1:])
    lines = ["usage: fwsel train [GROUP=OPTION ...] [KEY=VALUE ...] [-m] [--cfg job] [--hydra-help]", "",
             "Config groups (the default marked *; `fwsel train --help GROUP=OPTION` shows that option's keys):"]
    for group, options in groups(conf, dirs[1:]).items():
        lines.append(f"  {group}:")
        for opt in options:
            mark = "*" if chosen.get(group) == opt else " "
            lines.append(f"   {mark}{opt:<16} {header(option_file(group, opt, dirs))}")
    lines += ["", "Keys (KEY=VALUE; `fwsel train --cfg job [overrides]` prints the resolved config):"]
    sections = [("", conf / "train.yaml", "")]
    sections += [(f"{g}={o}", option_file(g, o, dirs), f"{g}.") for g, o in chosen.items()
                 if g != "experiment" and option_file(g, o, dirs)]
    for title, path, prefix in sections:
        if title:
            lines.append(f"  [{title}]")
        for k in parse(path, prefix):
            if k.path.rsplit(".", 1)[-1] in ("_target_",) or not k.doc:
                continue
            lines.append(f"  {k.path:<28} {k.value:<14} {k.doc}")
    lines += ["", "Hydra's own flags: --cfg job|hydra, --info, -m (multirun), -cd DIR; `--hydra-help` prints "
              "Hydra's help."]
    return "\n".join(lines)
