"""`python -m convert SRC --out DIR [--dtype ...] [--force]`: see convert/__init__.py."""

import argparse
import sys

from convert import DTYPES, ConversionError, convert


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m convert",
        description="Convert an HF Llama checkpoint directory or a GGUF file for lserve_jax.",
    )
    parser.add_argument("src", help="HF checkpoint dir (config.json + *.safetensors) or .gguf")
    parser.add_argument("--out", required=True, help="output directory (must not exist)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="parameter dtype")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    args = parser.parse_args(argv)
    try:
        out = convert(args.src, args.out, dtype=args.dtype, force=args.force)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
