"""`hf-qlimit`: the package's command line (the console script of pyproject.toml).

    hf-qlimit quantize MODEL --format gguf:q4_0 --calib valid.txt --output out --export gguf
    hf-qlimit export IN_DIR OUT_DIR --format compressed-tensors
    hf-qlimit gguf-to-hf --gguf model.gguf --output_dir folder

`python -m hf_qlimit.cli.main ...` is the same command. `hf-qlimit COMMAND --help` lists a command's flags.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


def _quantize(argv: list[str]) -> int:
    from .quantize import main

    return main(argv)


def _export(argv: list[str]) -> int:
    from ..export.__main__ import main

    return main(argv, prog="hf-qlimit export")


def _gguf_to_hf(argv: list[str]) -> int:
    from .gguf_to_hf import main

    return main(argv, prog="hf-qlimit gguf-to-hf") or 0


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "quantize": (_quantize, "quantize a model on a calibration text, save it, export it, summarise (the whole job)"),
    "export": (_export, "export a saved hf_qlimit folder to compressed-tensors or GGUF"),
    "gguf-to-hf": (_gguf_to_hf, "turn a GGUF file into a float32 transformers folder to quantize"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    commands = "\n".join(f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items())
    return f"usage: hf-qlimit COMMAND [ARGS...]\n\ncommands:\n{commands}\n\n{__doc__.split(chr(10) * 2)[1]}"


def main(argv: list[str] | None = None) -> int:
    """Runs `hf-qlimit COMMAND ...`; returns the exit status (2: unknown command)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not argv or argv[0] not in COMMANDS:
        given = f"unknown command {argv[0]!r}" if argv else "no command given"
        print(f"{usage()}\nhf-qlimit: error: {given}; choose one of {list(COMMANDS)}.", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]][0](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
