#!/usr/bin/env python
"""Write WebDataset shards (relalign layout: NNNNN.tar + manifest.json per split).

  python launch/make_shards.py synthetic --out data/synthetic
  python launch/make_shards.py karpathy --json dataset_flickr30k.json --images flickr30k-images \
      --out data/f30k
  python launch/make_shards.py table --input pairs.csv --images imgs/ --split train --out data/mine/train

Bad input (missing image, unreadable JSON, unknown split, missing column, a CSV row with more fields than its
header, an output split that would be empty, an --out that is a file) ends with one line `error: ...` on stderr
and exit code 2.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import check_output_dir  # noqa: E402
from pipeline.errors import UserError, exit_code_of  # noqa: E402
from pipeline.data.shards import write_split  # noqa: E402
from pipeline.data.sources import (KARPATHY_SPLITS, TABLE_FORMATS, ImageOptions, karpathy_entries,  # noqa: E402
                                   karpathy_samples, read_karpathy, read_table, table_samples)
from pipeline.data.synthetic import SyntheticConfig, build_synthetic_dataset, dataset_is_current  # noqa: E402

DEFAULT_KARPATHY_SPLITS = ("train=train+restval", "val=val", "test=test")


def parse_size(text: str) -> int:
    """Bytes from '500000', '200K', '64M', '1G' (powers of 1024)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B")
    try:
        return int(float(text[:-1]) * units[text[-1]]) if text and text[-1] in units else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500000, 200K, 64M)") from None


def add_shard_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-samples", type=int, default=1000,
                   help="most samples per shard (default 1000; 0 = no count limit, needs --max-bytes)")
    p.add_argument("--max-bytes", type=parse_size, default=None,
                   help="most bytes per shard file, e.g. 256M (default: no byte limit)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_image_options(p: argparse.ArgumentParser, images_default: str = "") -> None:
    p.add_argument("--images", type=Path, required=not images_default,
                   help="directory the image paths are relative to" + images_default)
    p.add_argument("--features", type=Path, default=None,
                   help="directory of precomputed region features, one <image stem>.npz per image with "
                        "features [n,d], boxes [n,4] (x1,y1,x2,y2 pixels) and image_size [2] (w,h)")
    p.add_argument("--max-side", type=int, default=None,
                   help="shrink images whose longer side is larger (re-encoded as JPEG); default: keep")
    p.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality when re-encoding (default 95)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    syn = sub.add_parser("synthetic", help="the embedded synthetic relational scenes (train/val/test)")
    syn.add_argument("--out", type=Path, required=True,
                     help="dataset root (gets train/ val/ test/ dataset.json)")
    syn.add_argument("--force", action="store_true", help="rebuild even if dataset.json matches the config")
    syn.add_argument("--quiet", action="store_true", help="no progress bar")
    defaults = SyntheticConfig()
    for f in fields(SyntheticConfig):
        value = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, tuple):
            syn.add_argument(flag, type=lambda s: tuple(x for x in s.split(",") if x), default=value,
                             help=f"{f.metadata['help']}, comma-separated (default {','.join(value)})")
        else:
            syn.add_argument(flag, type=type(value), default=value,
                             help=f"{f.metadata['help']} (default {value})")

    kar = sub.add_parser("karpathy", help="Karpathy split JSON (dataset_flickr30k.json / dataset_coco.json)")
    kar.add_argument("--json", type=Path, required=True, help="the Karpathy split file")
    kar.add_argument("--out", type=Path, required=True,
                     help="output root: one sub-directory per output split")
    kar.add_argument("--split", action="append", default=None, metavar="OUT=KSPLIT[+KSPLIT]",
                     help="output split made of Karpathy splits (" + ", ".join(KARPATHY_SPLITS) + "); "
                          "repeatable; default: " + " ".join(DEFAULT_KARPATHY_SPLITS))
    kar.add_argument("--limit", type=int, default=None, help="at most this many images per output split")
    add_image_options(kar)
    add_shard_options(kar)

    tab = sub.add_parser("table", help="CSV/TSV/JSONL with an image path and caption(s) per row")
    tab.add_argument("--input", type=Path, required=True,
                     help="the table; rows with the same image are grouped; in JSONL the caption field "
                          "may be a list")
    tab.add_argument("--out", type=Path, required=True, help="output split directory")
    tab.add_argument("--split", default="train", help="split name recorded in the manifest (default train)")
    tab.add_argument("--format", choices=TABLE_FORMATS, default=None, help="default: from the file suffix")
    tab.add_argument("--image-column", default="image", help="column with the image path (default image)")
    tab.add_argument("--caption-column", default="caption",
                     help="column with the caption(s) (default caption)")
    add_image_options(tab, " (default: the table's directory)")
    add_shard_options(tab)
    return parser


def run_synthetic(args: argparse.Namespace) -> None:
    cfg = SyntheticConfig(**{f.name: getattr(args, f.name) for f in fields(SyntheticConfig)})
    if not args.force and dataset_is_current(args.out, cfg):
        print(f"{args.out}: already built with this config (use --force to rebuild)")
        return
    build_synthetic_dataset(args.out, cfg, progress=not args.quiet)
    print(f"wrote {args.out}: train {cfg.train}, val {cfg.val}, test {cfg.test} images")


def parse_split_map(specs: list[str]) -> dict[str, list[str]]:
    out = {}
    for spec in specs:
        name, sep, parts = spec.partition("=")
        if not sep or not name.strip():
            raise UserError(f"--split {spec!r}: expected OUT=KSPLIT[+KSPLIT], e.g. train=train+restval")
        out[name.strip()] = [p.strip() for p in parts.split("+") if p.strip()]
    return out


def shard_limits(args: argparse.Namespace) -> dict:
    if args.max_samples < 0:
        raise UserError(f"--max-samples must be >= 0, got {args.max_samples}")
    return {"max_samples": args.max_samples or None, "max_bytes": args.max_bytes, "progress": not args.quiet}


def image_options(args: argparse.Namespace) -> ImageOptions:
    return ImageOptions(max_side=args.max_side, jpeg_quality=args.jpeg_quality, features_dir=args.features)


def split_entries(images: list[dict], split_map: dict[str, list[str]], json_path: Path,
                  limit: int | None) -> dict[str, list[dict]]:
    """The Karpathy entries of every output split; a split that would be empty is refused before any is written
    (training and evaluation on an empty split fail only when they first read it)."""
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    out = {name: karpathy_entries(images, ksplits)[:limit] for name, ksplits in split_map.items()}
    for name, entries in out.items():
        if not entries:
            raise UserError(f"--split {name}={'+'.join(split_map[name])}: {json_path} has no images in "
                            f"{'+'.join(split_map[name])}, so the {name} split would be empty; nothing written")
    return out


def run_karpathy(args: argparse.Namespace) -> None:
    split_map = parse_split_map(args.split or list(DEFAULT_KARPATHY_SPLITS))
    images = read_karpathy(args.json)
    opts, limits = image_options(args), shard_limits(args)
    for out_split, entries in split_entries(images, split_map, args.json, args.limit).items():
        manifest = write_split(karpathy_samples(entries, args.images, opts), args.out / out_split, out_split,
                               total=len(entries), **limits)
        print(f"wrote {args.out / out_split}: {manifest['samples']} images "
              f"in {len(manifest['shards'])} shards")


def run_table(args: argparse.Namespace) -> None:
    rows = read_table(args.input, args.image_column, args.caption_column, args.format)
    images = args.images or args.input.parent
    manifest = write_split(table_samples(rows, images, image_options(args)), args.out, args.split,
                           total=len(rows), **shard_limits(args))
    print(f"wrote {args.out}: {manifest['samples']} images in {len(manifest['shards'])} shards")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = {"synthetic": run_synthetic, "karpathy": run_karpathy, "table": run_table}[args.command]

    def work() -> None:
        check_output_dir(args.out, "--out")
        command(args)

    return exit_code_of(work)


if __name__ == "__main__":
    sys.exit(main())
