"""Loader throughput (decode + resize + normalise + tokenize + batch) beside a bare PIL loop.

Both sides use the same images (synthetic scenes stored as JPEG in the shards) and the same number
of processes: the loader with `--workers` DataLoader workers, the baseline with a process pool where
each process runs `Image.open(path).convert("RGB").resize((s, s))` over its share of the same JPEGs
(extracted to files). Each side runs `--repeats` times; the best time counts (start-up included).
Last line: RESULT samples_per_s=<x> pil_samples_per_s=<y> ratio_vs_pil=<x/y>.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data.loader import LoaderConfig, StreamingLoader  # noqa: E402
from pipeline.data.tokenizer import SentencePieceTokenizer, iter_captions  # noqa: E402


def make_data(root: Path, images: int, stored: int, shard_samples: int) -> Path:
    from pipeline.data.synthetic import SyntheticConfig, build_synthetic_dataset

    cfg = SyntheticConfig(seed=0, train=images, val=4, test=4, image_size=stored, shard_samples=shard_samples)
    build_synthetic_dataset(root, cfg, progress=False)
    return root / "train"


def extract_jpegs(split: Path, out: Path) -> list[str]:
    paths = []
    for tar_path in sorted(split.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    path = out / member.name
                    path.write_bytes(tar.extractfile(member).read())
                    paths.append(str(path))
    return paths


def _pil_chunk(args: tuple[list[str], int]) -> int:
    paths, size = args
    for path in paths:
        Image.open(path).convert("RGB").resize((size, size))
    return len(paths)


def time_pil(paths: list[str], size: int, workers: int) -> float:
    start = time.perf_counter()
    chunks = [(paths[w::workers], size) for w in range(workers)]
    with mp.get_context("fork").Pool(workers) as pool:
        done = sum(pool.map(_pil_chunk, chunks))
    assert done == len(paths)
    return time.perf_counter() - start


def time_loader(cfg: LoaderConfig, tokenizer) -> tuple[float, int]:
    start = time.perf_counter()
    loader = StreamingLoader(cfg, tokenizer)
    samples = sum(int(b["input_ids"].shape[0]) for b in loader)
    return time.perf_counter() - start, samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--stored-size", type=int, default=384, help="side of the stored JPEGs")
    ap.add_argument("--image-size", type=int, default=96, help="side the loader resizes to")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        split = make_data(tmp / "data", args.images, args.stored_size, args.images // (2 * args.workers))
        tokenizer = SentencePieceTokenizer.train(iter_captions([split]), tmp / "sp.model", 200)
        (tmp / "jpg").mkdir()
        paths = extract_jpegs(split, tmp / "jpg")
        cfg = LoaderConfig(shards=str(split), batch_size=args.batch_size, image_size=args.image_size,
                           num_workers=args.workers, shuffle_buffer=256, max_text_len=40)
        loader_runs, pil_runs = [], []
        for _ in range(args.repeats):   # interleaved so background load hits both alike
            loader_runs.append(time_loader(cfg, tokenizer))
            pil_runs.append(time_pil(paths, args.image_size, args.workers))
        loader_s, samples = min(loader_runs)
        pil_s = min(pil_runs)
    x, y = samples / loader_s, len(paths) / pil_s
    print(f"images={len(paths)} stored={args.stored_size}px target={args.image_size}px "
          f"workers={args.workers} batch={args.batch_size} repeats={args.repeats}")
    print(f"loader: {samples} samples in {loader_s:.3f} s (best of {args.repeats}); "
          f"PIL open/convert/resize: {len(paths)} images in {pil_s:.3f} s")
    print(f"RESULT samples_per_s={x:.1f} pil_samples_per_s={y:.1f} ratio_vs_pil={x / y:.3f}")


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:   # a benchmark always exits 0; the error is the result
        print(f"RESULT error={type(exc).__name__}: {exc}")
    sys.exit(0)
