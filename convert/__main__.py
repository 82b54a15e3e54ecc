"""`python -m convert SRC --out DIR [--dtype ...] [--force]` or `python -m convert DIR --verify`:
see convert/__init__.py."""

import argparse
import sys

from convert import DTYPES, CheckpointError, ConversionError, convert, verify_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m convert",
        description="Convert an HF Llama checkpoint directory or a GGUF file for lserve_jax, "
                    "or verify a converted directory.",
    )
    parser.add_argument("src", help="HF checkpoint dir (config.json + *.safetensors) or .gguf; "
                                    "with --verify: a converted directory")
    parser.add_argument("--out", help="output directory (must not exist)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="parameter dtype")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    parser.add_argument("--verify", action="store_true",
                        help="check the sizes and sha256 of every file of the converted "
                             "directory SRC against its convert_info.json")
    args = parser.parse_args(argv)
    if args.verify == (args.out is not None):
        parser.error("give either --out DIR (convert) or --verify (check a converted directory)")
    try:
        if args.verify:
            verify_checkpoint(args.src)
            print(f"{args.src}: ok")
            return 0
        out = convert(args.src, args.out, dtype=args.dtype, force=args.force)
    except (ConversionError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
