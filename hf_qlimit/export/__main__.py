"""python -m hf_qlimit.export IN_DIR OUT_DIR --format compressed-tensors"""

from __future__ import annotations

import argparse
import sys

from . import FORMATS, ExportError, export


def main(argv: list[str] | None = None, prog: str = "python -m hf_qlimit.export") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("in_dir", help="folder of a model saved by hf_qlimit (save_pretrained after quantize_qlimit)")
    parser.add_argument("out_dir", help="folder to write")
    parser.add_argument("--format", default="compressed-tensors", choices=FORMATS)
    parser.add_argument(
        "--allow_unservable",
        action="store_true",
        help="export asymmetric 2/3-bit weights to compressed-tensors anyway (by its docs vLLM's kernels take asymmetric weights only at 4 and 8 bits)",
    )
    args = parser.parse_args(argv)
    try:
        out = export(args.in_dir, args.out_dir, format=args.format, allow_unservable=args.allow_unservable)
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"Wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
