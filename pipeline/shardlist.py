"""Which tar shards a spec names, and how many samples each holds.

A spec is a manifest path, a split directory (its `manifest.json`, else its `*.tar`), or a brace
pattern (`/data/train/{00000..00007}.tar`); counts come from the manifest when one covers the shards,
else from one scan of the tar headers.
"""
from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import braceexpand

from pipeline.errors import UserError
from pipeline.shards import MANIFEST_NAME, read_manifest


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
    from pipeline.decode import BadSample, captions_of, parse_meta
    try:
        return captions_of(sample, parse_meta(sample))
    except BadSample:
        return []
