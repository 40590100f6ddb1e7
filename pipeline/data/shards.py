"""WebDataset tar shards in the relalign layout: writing (atomic, sized shards + manifest) and light reading.

A split directory holds ``00000.tar, 00001.tar, ...`` and ``manifest.json`` (format in CONTRACTS.md).
The tar files themselves are written by ``webdataset.TarWriter``; this module only decides where a shard
ends, makes every file appear atomically and records the exact per-shard sample counts.
"""
from __future__ import annotations

import io
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import braceexpand
from tqdm import tqdm

from pipeline.errors import UserError


MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "relalign-shards/1"
IMAGE_EXTS = ("jpg", "png")
_SHARD_RE = re.compile(r"^\d{5}\.tar$")
_BLOCK = 512            # tar header / data block
_RECORD = 20 * _BLOCK   # tarfile pads a closed stream to whole records
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


@dataclass
class Sample:
    """One image with its captions, ready to be written as tar members sharing ``key``.

    ``meta`` becomes the ``json`` member and must hold ``captions`` (non-empty list of str),
    ``width`` and ``height``; ``txt`` is derived from the first caption.
    """

    key: str
    image: bytes
    image_ext: str
    meta: dict
    npz: bytes | None = None

    def members(self) -> dict[str, bytes]:
        captions = self.meta.get("captions")
        if not captions or not all(isinstance(c, str) and c.strip() for c in captions):
            raise UserError(f"sample {self.key}: needs at least one non-empty caption")
        meta = {"image_id": self.key, **self.meta}
        out = {
            self.image_ext: self.image,
            "txt": captions[0].encode("utf-8"),
            "json": json.dumps(meta, ensure_ascii=False, separators=(",", ":")).encode("utf-8"),
        }
        if self.npz is not None:
            out["npz"] = self.npz
        return out


def _tar_entry_bytes(members: dict[str, bytes]) -> int:
    return sum(_BLOCK + -(-len(v) // _BLOCK) * _BLOCK for v in members.values())


def _closed_tar_bytes(entries: int) -> int:
    return -(-(entries + 2 * _BLOCK) // _RECORD) * _RECORD


@dataclass
class _OpenShard:
    index: int
    tmp_path: Path
    stream: io.BufferedWriter
    writer: object  # webdataset.TarWriter
    samples: int = 0
    entry_bytes: int = 0


@dataclass
class ShardWriter:
    """Writes samples of one split into ``out_dir/{00000..N}.tar`` plus ``manifest.json``.

    A shard is closed when it holds ``max_samples`` samples or when the next sample would push it past
    ``max_bytes`` (a single sample larger than ``max_bytes`` still gets a shard of its own). Every
    shard and the manifest are written to a hidden temp file first and renamed into place, the old
    manifest is removed on start, and numbered shards left from an earlier, larger write are deleted
    on close, so a directory with a manifest is always complete and consistent.
    """

    out_dir: Path
    split: str
    max_samples: int | None = 1000
    max_bytes: int | None = None
    total: int | None = None
    progress: bool = True
    shards: list[dict] = field(default_factory=list, init=False)
    _keys: set[str] = field(default_factory=set, init=False)
    _open: _OpenShard | None = field(default=None, init=False)
    _regions: list[bool] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        if self.max_samples is None and self.max_bytes is None:
            raise UserError("shards need a limit: give max_samples and/or max_bytes")
        if self.max_samples is not None and self.max_samples < 1:
            raise UserError(f"max_samples must be >= 1, got {self.max_samples}")
        if self.max_bytes is not None and self.max_bytes < _RECORD:
            raise UserError(f"max_bytes must be >= {_RECORD}, got {self.max_bytes}")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / MANIFEST_NAME).unlink(missing_ok=True)
        self._bar = tqdm(total=self.total, desc=f"shards {self.split}", unit="img",
                         disable=not self.progress, leave=False)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()

    def write(self, sample: Sample) -> None:
        if not _KEY_RE.match(sample.key):
            raise UserError(f"sample key {sample.key!r}: use only letters, digits, '_' and '-'")
        if sample.key in self._keys:
            raise UserError(f"duplicate sample key {sample.key!r} in split {self.split}")
        if sample.image_ext not in IMAGE_EXTS:
            raise UserError(f"sample {sample.key}: image extension must be one of {IMAGE_EXTS}")
        members = sample.members()
        size = _tar_entry_bytes(members)
        if self._open is not None and self._is_full(size):
            self._finish()
        if self._open is None:
            self._start(len(self.shards))
        self._open.writer.write({"__key__": sample.key, **members})
        self._open.samples += 1
        self._open.entry_bytes += size
        self._keys.add(sample.key)
        self._regions.append(sample.npz is not None)
        self._bar.update(1)

    def close(self) -> dict:
        """Finish the last shard, delete stale shards, write the manifest; returns the manifest."""
        if self._open is not None:
            self._finish()
        self._bar.close()
        keep = {s["url"] for s in self.shards}
        for path in self.out_dir.iterdir():
            if _SHARD_RE.match(path.name) and path.name not in keep:
                path.unlink()
        manifest = {
            "format": MANIFEST_FORMAT,
            "split": self.split,
            "samples": sum(s["samples"] for s in self.shards),
            "shards": self.shards,
            "has_regions": bool(self._regions) and all(self._regions),
        }
        _atomic_write(self.out_dir / MANIFEST_NAME, (json.dumps(manifest, indent=1) + "\n").encode())
        return manifest

    def _is_full(self, next_size: int) -> bool:
        shard = self._open
        if self.max_samples is not None and shard.samples >= self.max_samples:
            return True
        if self.max_bytes is not None:
            return _closed_tar_bytes(shard.entry_bytes + next_size) > self.max_bytes
        return False

    def _start(self, index: int) -> None:
        import webdataset as wds  # imports torch (seconds): only when something is written

        tmp = self.out_dir / f".{index:05d}.tar.tmp"
        stream = open(tmp, "wb")
        # Fixed owner/mtime: the same samples give byte-identical shards.
        writer = wds.TarWriter(stream, encoder=False, mtime=0, user="relalign", group="relalign")
        self._open = _OpenShard(index, tmp, stream, writer)

    def _finish(self) -> None:
        shard, self._open = self._open, None
        shard.writer.close()
        shard.stream.flush()
        os.fsync(shard.stream.fileno())
        shard.stream.close()
        name = f"{shard.index:05d}.tar"
        os.replace(shard.tmp_path, self.out_dir / name)
        self.shards.append({"url": name, "samples": shard.samples,
                            "bytes": (self.out_dir / name).stat().st_size})

    def _abort(self) -> None:
        self._bar.close()
        if self._open is not None:
            shard, self._open = self._open, None
            shard.writer.close()  # before the file: tarfile flushes its buffer on close
            shard.stream.close()
            shard.tmp_path.unlink(missing_ok=True)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_split(samples, out_dir: Path, split: str, *, max_samples: int | None = 1000,
                max_bytes: int | None = None, total: int | None = None, progress: bool = True) -> dict:
    """Writes an iterable of ``Sample`` as one split; returns the manifest."""
    with ShardWriter(Path(out_dir), split, max_samples=max_samples, max_bytes=max_bytes,
                     total=total, progress=progress) as writer:
        for sample in samples:
            writer.write(sample)
    return read_manifest(out_dir)


def manifest_path(path_or_dir: str | Path) -> Path:
    path = Path(path_or_dir)
    return path / MANIFEST_NAME if path.is_dir() else path


def read_manifest(path_or_dir: str | Path) -> dict:
    """Loads and checks a split manifest (a ``manifest.json`` path or the split directory)."""
    path = manifest_path(path_or_dir)
    if not path.is_file():
        raise UserError(f"no shard manifest at {path}: write the split with launch/make_shards.py first")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read shard manifest {path}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{path}: not a relalign shard manifest (expected format {MANIFEST_FORMAT!r})")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(
            isinstance(s, dict) and isinstance(s.get("url"), str) and isinstance(s.get("samples"), int)
            for s in shards):
        raise UserError(f"{path}: field 'shards' must be a list of {{url, samples, bytes}}")
    if manifest.get("samples") != sum(s["samples"] for s in shards):
        raise UserError(f"{path}: 'samples' does not equal the sum of the per-shard counts")
    return manifest


def shard_paths(path_or_dir: str | Path) -> list[Path]:
    """Absolute paths of the shards a manifest lists, in order."""
    path = manifest_path(path_or_dir)
    return [path.parent / s["url"] for s in read_manifest(path)["shards"]]


# ----------------------------------------------------------------------------- reading: which shards a spec names

@dataclass(frozen=True)
class Shard:
    url: str
    samples: int


def _read_manifest(path: Path) -> list[Shard]:
    return [Shard(str((path.parent / e["url"]).resolve()), e["samples"]) for e in read_manifest(path)["shards"]]


def count_samples(url: str) -> int:
    """Distinct sample keys in a tar (headers only; stops quietly at a truncated end)."""
    keys = set()
    try:
        with tarfile.open(url, mode="r|*") as tar:
            for member in tar:
                if member.isreg():
                    name = member.name
                    keys.add(name[: name.find(".", name.rfind("/") + 1)])
    except (tarfile.TarError, OSError, EOFError):
        pass
    return len(keys)


def resolve_shards(spec: str) -> list[Shard]:
    path = Path(spec)
    if path.is_dir():
        if (path / MANIFEST_NAME).is_file():
            return _read_manifest(path / MANIFEST_NAME)
        urls = sorted(str(p.resolve()) for p in path.glob("*.tar"))
        if not urls:
            raise UserError(f"shards {spec}: directory has no manifest.json and no .tar files")
        return [Shard(u, count_samples(u)) for u in urls]
    if path.suffix == ".json":
        if not path.is_file():
            raise UserError(f"manifest {spec} not found: pass a split directory, manifest or brace pattern")
        return _read_manifest(path)
    urls = [str(Path(u).resolve()) for u in braceexpand.braceexpand(spec)]
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise UserError(f"shards {spec}: {len(missing)} file(s) missing, e.g. {missing[0]}")
    known: dict[str, int] = {}
    for manifest in {Path(u).parent / MANIFEST_NAME for u in urls}:
        if manifest.is_file():
            known.update((s.url, s.samples) for s in _read_manifest(manifest))
    return [Shard(u, known[u] if u in known else count_samples(u)) for u in urls]


def iter_shard_captions(spec: str) -> Iterator[str]:
    """Every caption of every sample (json `captions`, else img2dataset `caption`, else `.txt`)."""
    for shard in resolve_shards(spec):
        samples: dict[str, dict[str, bytes]] = {}
        try:
            with tarfile.open(shard.url, mode="r|*") as tar:
                for member in tar:
                    stem, _, ext = member.name.rpartition(".")
                    if member.isreg() and ext in ("txt", "json"):
                        samples.setdefault(stem, {})[ext] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError):
            pass
        for sample in samples.values():
            yield from _captions_of(sample)


def _captions_of(sample: dict[str, bytes]) -> list[str]:
    """The sample's captions by the loader's own rules; none for a sample the loader would skip."""
    from pipeline.data.decode import BadSample, captions_of, parse_meta
    try:
        return captions_of(sample, parse_meta(sample))
    except BadSample:
        return []
