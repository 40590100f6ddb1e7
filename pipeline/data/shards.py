"""WebDataset tar shards in the relalign layout: writing (atomic, sized shards + manifest) and light reading.

A split directory holds ``00000.tar, 00001.tar, ...`` and ``manifest.json`` (per-shard sample counts, checked
by ``parse_manifest``). The tar files themselves are written by ``webdataset.TarWriter``; this module only
decides where a shard ends, makes every file appear atomically and records the exact per-shard sample counts.

A shard spec (``data.train``, ``pretrain.sources[].shards``, ``--shards``) is one of:

* local: a split directory, a ``manifest.json``, a ``.tar`` file or a brace pattern ``dir/{00000..00009}.tar``
  (shards without a manifest are counted by reading their headers);
* ``http(s)://host/path/train/`` (a directory URL: its ``manifest.json`` lists the shards), ``http(s)://
  .../manifest.json``, or ``http(s)://host/path/train/{00000..00009}.tar`` (the ``manifest.json`` in the
  same directory gives the counts);
* ``pipe:CMD`` with a brace pattern in the shard's file name, e.g. ``pipe:aws s3 cp s3://b/train/{00000..00009}.tar
  -``: webdataset runs each command and reads the tar from its stdout; the manifest is read by the same
  command with the shard's file name replaced by ``manifest.json`` (``pipe:aws s3 cp s3://b/train/manifest.json
  -``).

Remote specs are never turned into local paths: the loader hands the URLs / commands to webdataset as they
are (curl for URLs, a shell for ``pipe:``). Their manifest is required (counting remote shards would mean
downloading them) and read at start-up, so an unreachable server, a missing manifest or shards the manifest
does not list is a one-line ``UserError`` before training starts.
"""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote, urljoin, urlsplit

import braceexpand
from tqdm import tqdm

from pipeline.config import is_remote
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
    return parse_manifest(path.read_bytes(), str(path))


def parse_manifest(data: bytes, where: str) -> dict:
    """Checks the manifest bytes read from ``where`` (a path, URL or pipe: command, for messages)."""
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read shard manifest {where}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{where}: not a relalign shard manifest (expected format {MANIFEST_FORMAT!r})")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(
            isinstance(s, dict) and isinstance(s.get("url"), str) and isinstance(s.get("samples"), int)
            for s in shards):
        raise UserError(f"{where}: field 'shards' must be a list of {{url, samples, bytes}}")
    if manifest.get("samples") != sum(s["samples"] for s in shards):
        raise UserError(f"{where}: 'samples' does not equal the sum of the per-shard counts")
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


def _sample_key(member_name: str) -> str:
    return member_name[: member_name.find(".", member_name.rfind("/") + 1)]


def count_samples(url: str) -> int:
    """Distinct sample keys in a tar, from its member headers only; stops quietly at a truncated end.

    A plain tar is read by seeking from header to header (member data is never read, so the cost is one
    512-byte read per member, whatever the image sizes) and a member whose data runs past the end of the file
    is not counted; a compressed tar has to be streamed through."""
    keys = set()
    try:
        size = os.path.getsize(url)
        with tarfile.open(url, mode="r:") as tar:
            for member in tar:
                if member.isreg() and member.offset_data + member.size <= size:
                    keys.add(_sample_key(member.name))
    except tarfile.ReadError:
        if not keys:
            return _count_streamed(url)
    except (tarfile.TarError, OSError, EOFError):
        pass
    return len(keys)


def _count_streamed(url: str) -> int:
    keys = set()
    try:
        with tarfile.open(url, mode="r|*") as tar:
            for member in tar:
                if member.isreg():
                    keys.add(_sample_key(member.name))
    except (tarfile.TarError, OSError, EOFError):
        pass
    return len(keys)


def resolve_shards(spec: str) -> list[Shard]:
    """The shards ``spec`` names with their sample counts (the spec forms are in the module docstring)."""
    if is_remote(spec):
        return _resolve_remote(spec)
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


# ----------------------------------------------------------------------------- start-up: tars agree with their manifest

FULL_SCAN_SAMPLES = 20_000   # a split listing at most this many samples has every tar's headers counted
_MIN_SAMPLE_BYTES = 2 * _BLOCK  # the least a sample takes in a tar: one member header and one data block


@dataclass(frozen=True)
class ListedShard:
    """A local tar as its manifest lists it."""
    path: Path
    samples: int
    bytes: int | None
    manifest: Path


def verify_local_shards(spec: str) -> None:
    """UserError unless the local shards ``spec`` names are there, non-empty and hold what their manifest says.

    Every named tar must exist and be non-empty (a 0-byte tar is an interrupted write or download). A tar listed
    in a manifest is counted (headers only, see ``count_samples``) and compared with its manifest count when

    * the split lists at most ``FULL_SCAN_SAMPLES`` samples: every tar is counted. Counting costs one 512-byte
      read per tar member, not the data, but tarfile's Python per member dominates: measured 1.3 s for
      10,000 samples of 3 members (230 MB), warm or cold page cache, so a small split costs at most ~3 s;
    * or, for a larger split, the tar contradicts its manifest entry: its size differs from the manifest's
      ``bytes``, or it is too small to hold the listed samples (at least 1 KiB each). A full scan of a
      10-million-sample split would take ~20 minutes at every start, so a manifest whose counts were edited
      without changing the tars goes unnoticed there.

    Tars without a manifest are counted when the shards are resolved, so only their emptiness is checked.
    """
    listed = listed_local_shards(spec)
    for path in _named_local_tars(spec, listed):
        _check_tar_present(path, next((e.manifest for e in listed if e.path == path), None))
    full_scan = sum(e.samples for e in listed) <= FULL_SCAN_SAMPLES
    for entry in listed:
        size = entry.path.stat().st_size
        if full_scan or _contradicts_manifest(entry, size):
            _check_listed_count(entry, size)


def listed_local_shards(spec: str) -> list[ListedShard]:
    """The manifest entries of the local tars ``spec`` names (none for tars without a manifest)."""
    path = Path(spec)
    if path.is_dir() or path.suffix == ".json":
        manifest = manifest_path(path)
        return _manifest_entries(manifest) if manifest.is_file() else []
    named = {Path(u).resolve() for u in braceexpand.braceexpand(spec)}
    entries: list[ListedShard] = []
    for manifest in sorted({p.parent / MANIFEST_NAME for p in named}):
        if manifest.is_file():
            entries += [e for e in _manifest_entries(manifest) if e.path in named]
    return entries


def _manifest_entries(manifest: Path) -> list[ListedShard]:
    manifest = manifest.resolve()
    return [ListedShard((manifest.parent / e["url"]).resolve(), e["samples"],
                        e["bytes"] if isinstance(e.get("bytes"), int) else None, manifest)
            for e in read_manifest(manifest)["shards"]]


def _named_local_tars(spec: str, listed: list[ListedShard]) -> list[Path]:
    path = Path(spec)
    if listed and (path.is_dir() or path.suffix == ".json"):
        return [e.path for e in listed]
    if path.is_dir():
        return sorted(p.resolve() for p in path.glob("*.tar"))
    if path.suffix == ".json":
        return []
    return [Path(u).resolve() for u in braceexpand.braceexpand(spec)]


def _check_tar_present(path: Path, manifest: Path | None) -> None:
    if not path.is_file():
        where = f"listed in {manifest} but " if manifest else ""
        raise UserError(f"shard {path} is {where}missing: copy it back, or rewrite the split with "
                        f"launch/make_shards.py")
    if path.stat().st_size == 0:
        raise UserError(f"shard {path} is an empty file (0 bytes; an interrupted write or download?): "
                        f"rewrite or re-download it, or remove it from the split")
    if not tarfile.is_tarfile(path):   # one header read: a text file or a JSON given where shards belong
        raise UserError(f"shard {path} is not a tar file: give a shard directory, manifest, .tar or brace pattern")


def _contradicts_manifest(entry: ListedShard, size: int) -> bool:
    return (entry.bytes is not None and entry.bytes != size) or entry.samples * _MIN_SAMPLE_BYTES > size


def _check_listed_count(entry: ListedShard, size: int) -> None:
    found = count_samples(str(entry.path))
    if found == entry.samples:
        return
    sizes = f"{size} bytes" + (f", the manifest says {entry.bytes}" if entry.bytes not in (None, size) else "")
    raise UserError(f"shard {entry.path} holds {found} samples but its manifest {entry.manifest} lists "
                    f"{entry.samples} ({sizes}): the tars and the manifest do not belong together; rewrite the "
                    f"split with launch/make_shards.py, or delete the manifest.json to have the tars counted")


def iter_shard_captions(spec: str) -> Iterator[str]:
    """Every caption of every sample (json `captions`, else img2dataset `caption`, else `.txt`)."""
    for shard in resolve_shards(spec):
        samples: dict[str, dict[str, bytes]] = {}
        try:
            with _open_shard(shard.url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    stem, _, ext = member.name.rpartition(".")
                    if member.isreg() and ext in ("txt", "json"):
                        samples.setdefault(stem, {})[ext] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError):
            pass
        for sample in samples.values():
            yield from _captions_of(sample)


def _open_shard(url: str):
    if not is_remote(url):
        return open(url, "rb")
    from webdataset import gopen   # the loader's own opener (curl for URLs, a shell for pipe:); imports torch
    return gopen(url, "rb")


# ----------------------------------------------------------------------------- remote specs: URLs and pipe: commands

FETCH_TIMEOUT_S = 60
URL_SCHEMES = ("http", "https")
# The shard's file name inside a URL or command: what "beside the shards" replaces with manifest.json.
_TAR_NAME_RE = re.compile(r"[^\s/'\"=:]+\.tar(?![\w.])")


class _Absent(Exception):
    """The server or command answered, but the file is not there (``http_status``: the HTTP code, if any)."""

    def __init__(self, reason: str, http_status: int | None = None):
        super().__init__(reason)
        self.http_status = http_status


def read_beside(shard_url: str, name: str) -> bytes | None:
    """File ``name`` from the directory of a shard (local path, URL or pipe: command); None if it is not there."""
    if not is_remote(shard_url):
        path = Path(shard_url).parent / name
        try:
            return path.read_bytes() if path.is_file() else None
        except OSError as e:
            raise UserError(f"cannot read {path} ({e.strerror}): check its permissions") from None
    try:
        return _fetch(_beside(shard_url, name))
    except _Absent:
        return None


def _resolve_remote(spec: str) -> list[Shard]:
    if spec.startswith("pipe:"):
        return _listed_shards(list(braceexpand.braceexpand(spec)))
    scheme = urlsplit(spec).scheme
    if scheme not in URL_SCHEMES:
        raise UserError(f"shards {spec}: {scheme}:// is not read directly; give a local path, an http(s):// URL "
                        f"or a pipe: command that writes each shard to stdout "
                        f"(e.g. 'pipe:aws s3 cp s3://b/train/{{00000..00009}}.tar -')")
    last = urlsplit(spec).path.rsplit("/", 1)[-1]
    if last.endswith(".tar"):
        shards = _listed_shards(list(braceexpand.braceexpand(spec)))
    else:
        manifest_url = spec if last.endswith(".json") else spec.rstrip("/") + "/" + MANIFEST_NAME
        entries = _remote_manifest(manifest_url)["shards"]
        shards = [Shard(urljoin(manifest_url, e["url"]), e["samples"]) for e in entries]
    if shards:
        _check_url_exists(shards[-1].url)   # a manifest uploaded before its last shard fails here, not mid-run
    return shards


def _listed_shards(locations: list[str]) -> list[Shard]:
    """Each shard URL or command with its count from the manifest beside it."""
    counts: dict[str, dict[str, int]] = {}   # by manifest location: shard name -> samples
    shards, unlisted = [], []
    for location in locations:
        manifest = _beside(location, MANIFEST_NAME)
        if manifest not in counts:
            counts[manifest] = {e["url"]: e["samples"] for e in _remote_manifest(manifest)["shards"]}
        name = _shard_name(location)
        if name in counts[manifest]:
            shards.append(Shard(location, counts[manifest][name]))
        else:
            unlisted.append((location, manifest))
    if unlisted:
        location, manifest = unlisted[0]
        raise UserError(f"{len(unlisted)} of {len(locations)} shard(s) are not in their manifest, e.g. {location} "
                        f"(the manifest {manifest} lists {len(counts[manifest])}): fix the brace range or "
                        f"rewrite the shards and their manifest")
    return shards


def _remote_manifest(location: str) -> dict:
    try:
        data = _fetch(location)
    except _Absent as e:
        raise UserError(f"no shard manifest at {location} ({e}): remote shards need the manifest.json that "
                        f"launch/make_shards.py writes beside them; copy it next to the shards") from None
    return parse_manifest(data, location)


def _fetch(location: str) -> bytes:
    """Bytes of a URL or of a ``pipe:`` command's stdout; _Absent when the file is not there."""
    if location.startswith("pipe:"):
        return _run_pipe(location)
    with _urlopen(location) as response:
        return response.read()


def _check_url_exists(url: str) -> None:
    try:
        _urlopen(url, method="HEAD").close()
    except _Absent as e:
        if e.http_status not in (404, 410):   # e.g. 403 from a URL signed for GET only: the fetch will tell
            return
        raise UserError(f"shard {url} is listed in its manifest but the server does not have it ({e}): "
                        f"upload every shard the manifest lists") from None


def _urlopen(url: str, method: str = "GET"):
    try:
        return urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=FETCH_TIMEOUT_S)
    except urllib.error.HTTPError as e:
        raise _Absent(f"HTTP {e.code} {e.reason}", e.code) from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise UserError(f"cannot reach {url} ({getattr(e, 'reason', e)}): check the host, port and network, "
                        f"and that the server is up") from None


def _run_pipe(command: str) -> bytes:
    # shell=True like webdataset's own pipe: shards, so the manifest is read exactly the way the shards are
    try:
        done = subprocess.run(command[len("pipe:"):], shell=True, capture_output=True, timeout=FETCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise UserError(f"{command!r} did not finish within {FETCH_TIMEOUT_S} s: check the command and "
                        f"its network") from None
    if done.returncode != 0:
        lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise _Absent(f"exit {done.returncode}" + (f": {lines[-1].strip()}" if lines else ""))
    return done.stdout


def _beside(location: str, name: str) -> str:
    """The URL or pipe: command that reads file ``name`` from the directory of the shard at ``location``."""
    if location.startswith("pipe:"):
        match = _tar_name(location)
        return location[:match.start()] + name + location[match.end():]
    return urljoin(location, name)


def _shard_name(location: str) -> str:
    if location.startswith("pipe:"):
        return _tar_name(location).group()
    return unquote(urlsplit(location).path.rsplit("/", 1)[-1])


def _tar_name(command: str) -> re.Match:
    matches = list(_TAR_NAME_RE.finditer(command))
    if not matches:
        raise UserError(f"shards {command!r}: a pipe: command must name its shard file (NAME.tar, brace range "
                        f"allowed) so that the manifest.json beside it can be read the same way")
    return matches[-1]


def _captions_of(sample: dict[str, bytes]) -> list[str]:
    """The sample's captions by the loader's own rules; none for a sample the loader would skip."""
    from pipeline.data.decode import BadSample, captions_of, parse_meta
    try:
        return captions_of(sample, parse_meta(sample))
    except BadSample:
        return []
