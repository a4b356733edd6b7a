"""Write a synthetic catalogue ZIP in the official Rakuten layout.

Example: ``python -m jobs.make_sample --out sample.zip --products 2000 --seed 0``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lib.data.sample import SampleSpec, imbalance_ratio, write_sample_zip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of the sample generator."""
    parser = argparse.ArgumentParser(prog="python -m jobs.make_sample", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="ZIP file to write.")
    parser.add_argument("--products", type=int, required=True, help="Number of products.")
    parser.add_argument("--seed", type=int, default=0, help="Same seed, same bytes.")
    parser.add_argument("--image-size", type=int, default=SampleSpec.image_size, help="Image side in pixels.")
    parser.add_argument("--top-folder", default=None, help="Prefix every member with this folder.")
    parser.add_argument("--unlabelled", action="store_true", help="Leave out the Y file (prdtypecode).")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Generate the sample and print a one-line summary."""
    args = parse_args(argv)
    spec = SampleSpec(
        products=args.products,
        seed=args.seed,
        image_size=args.image_size,
        top_folder=args.top_folder,
        with_labels=not args.unlabelled,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # Write beside the target then rename, so an interrupted run never leaves a truncated ZIP behind.
    partial = args.out.with_name(args.out.name + ".part")
    catalogue = write_sample_zip(spec, partial)
    partial.replace(args.out)
    seconds = time.perf_counter() - start
    print(
        f"{args.out}: {len(catalogue)} products, {catalogue['prdtypecode'].nunique()} classes, "
        f"largest/smallest {imbalance_ratio(catalogue):.1f}, {args.out.stat().st_size} bytes, "
        f"{seconds:.1f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
