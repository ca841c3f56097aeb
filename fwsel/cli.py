"""`fwsel <command> ...`: a thin dispatcher, so `fwsel train` keeps all of Hydra's CLI (-m, --cfg,
--help, tab completion)."""

from __future__ import annotations

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
        from fwsel.train import main as train_main

        sys.argv = ["fwsel", *rest]
        train_main()
        return 0
    if cmd == "compare":
        from fwsel.compare import main as compare_main

        return compare_main(rest)
    if cmd == "export-selection":
        from fwsel.export import main as export_main

        return export_main(rest)
    print(f"fwsel: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
