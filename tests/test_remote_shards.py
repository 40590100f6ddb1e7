"""Shards read over HTTP (a real `python -m http.server` on 127.0.0.1) and through `pipe:` commands: the same
samples as the local shards, and one-line UserErrors at validation for unreachable servers, missing manifests
and manifests that disagree with the spec."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.config import load_config, split_path
from pipeline.data.paths import check_shards_exist, validate_paths
from pipeline.data.eval_split import load_eval_split
from pipeline.data.loader import BatchStream, LoaderConfig
from pipeline.data.shards import iter_shard_captions, resolve_shards
from pipeline.data.tokenizer import load_tokenizer
from pipeline.errors import UserError

SERVER_START_TIMEOUT_S = 30
# webdataset opens http(s) shards with curl (its gopen); manifests are read with urllib and need nothing
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset reads http shards with curl")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """Synthetic splits written by the project's shard writer (train: 4 shards of 12), a tokenizer, and copies
    broken on purpose: ``nomanifest/`` (tars only), ``partial/`` (manifest lists a shard that is absent) and
    ``badcount/`` (the manifest's total disagrees with its shards)."""
    from pipeline.data.synthetic import SyntheticConfig, ensure_synthetic_dataset
    from pipeline.data.tokenizer import SentencePieceTokenizer, iter_captions
    root = tmp_path_factory.mktemp("remote_shards")
    cfg = SyntheticConfig(train=48, val=12, test=12, image_size=32, shard_samples=12, captions_per_image=2,
                          attribute_captions=1, max_objects=2, relations=6)
    ensure_synthetic_dataset(root, cfg, progress=False)
    SentencePieceTokenizer.train(iter_captions([str(root / "train")]), root / "tok.model", 100)
    shutil.copytree(root / "train", root / "nomanifest")
    (root / "nomanifest" / "manifest.json").unlink()
    shutil.copytree(root / "train", root / "partial")
    (root / "partial" / "00003.tar").unlink()
    shutil.copytree(root / "train", root / "badcount")
    manifest = json.loads((root / "badcount" / "manifest.json").read_text())
    manifest["samples"] += 1
    (root / "badcount" / "manifest.json").write_text(json.dumps(manifest))
    return {"root": root, "tokenizer": load_tokenizer(root / "tok.model")}


@pytest.fixture(scope="module")
def server(data) -> str:
    """http://127.0.0.1:PORT serving the data root; stopped by its PID at teardown."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port),
                             "--directory", str(data["root"])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_serving(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_until_serving(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"http.server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/train/manifest.json", timeout=2):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"http.server not serving after {SERVER_START_TIMEOUT_S} s")


def loader_cfg(shards: str, **kw) -> LoaderConfig:
    base = dict(shards=shards, batch_size=4, image_size=32, max_text_len=32, num_workers=0, shuffle_buffer=16,
                seed=3)
    return LoaderConfig(**{**base, **kw})


def epoch_ids(shards: str, tokenizer, **kw) -> list[list[int]]:
    stream = BatchStream(loader_cfg(shards, **kw), tokenizer, rank=0, world_size=1)
    return [next(stream)["image_id"].tolist() for _ in range(stream.loader.batches_per_epoch)]


def pipe_cat(split_dir: Path) -> str:
    return f"pipe:cat {split_dir}/{{00000..00003}}.tar"


# ----------------------------------------------------------------------------- the same samples as local shards

@needs_curl
@pytest.mark.parametrize("form", ["{url}/train/", "{url}/train", "{url}/train/manifest.json",
                                  "{url}/train/{{00000..00003}}.tar"])
def test_batch_stream_over_http_matches_local(data, server, form):
    local = epoch_ids(str(data["root"] / "train"), data["tokenizer"])
    assert epoch_ids(form.format(url=server), data["tokenizer"]) == local and len(local) == 12


@needs_curl
def test_http_with_dataloader_workers(data, server):
    """Workers open the URLs themselves (webdataset's gopen, curl)."""
    local = epoch_ids(str(data["root"] / "train"), data["tokenizer"], num_workers=2)
    assert epoch_ids(f"{server}/train/", data["tokenizer"], num_workers=2) == local


def test_remote_shards_keep_their_urls(data, server):
    shards = resolve_shards(f"{server}/train/")
    assert [s.url for s in shards] == [f"{server}/train/{i:05d}.tar" for i in range(4)]
    assert [s.samples for s in shards] == [12] * 4
    spec = pipe_cat(data["root"] / "train")
    assert [s.url for s in resolve_shards(spec)] == [f"pipe:cat {data['root']}/train/{i:05d}.tar" for i in range(4)]


def test_pipe_spec_matches_local(data):
    train = data["root"] / "train"
    assert epoch_ids(pipe_cat(train), data["tokenizer"]) == epoch_ids(str(train), data["tokenizer"])


@needs_curl
@pytest.mark.parametrize("remote", ["{url}/relations/", "pipe:cat {root}/relations/00000.tar"])
def test_eval_split_and_its_quadruples_remote(data, server, remote):
    local_dir = data["root"] / "relations"
    cfg = loader_cfg(str(local_dir))
    local = load_eval_split(str(local_dir), data["tokenizer"], cfg)
    spec = remote.format(url=server, root=data["root"])
    ev = load_eval_split(spec, data["tokenizer"], cfg)
    assert ev.image_keys == local.image_keys and ev.captions == local.captions
    assert ev.quadruples == local.quadruples and len(ev.quadruples) > 0


@needs_curl
def test_tokenizer_captions_from_http(data, server):
    local = list(iter_shard_captions(str(data["root"] / "train")))
    assert list(iter_shard_captions(f"{server}/train/")) == local and len(local) >= 96


# ----------------------------------------------------------------------------- bad specs: one-line UserErrors

def test_unreachable_server_names_the_url():
    url = f"http://127.0.0.1:{_free_port()}/train/"
    with pytest.raises(UserError, match=rf"cannot reach {url}manifest.json .*server is up"):
        resolve_shards(url)


def test_missing_manifest_names_the_url(data, server):
    with pytest.raises(UserError, match=rf"no shard manifest at {server}/nomanifest/manifest.json \(HTTP 404"):
        resolve_shards(f"{server}/nomanifest/")
    with pytest.raises(UserError, match=rf"no shard manifest at {server}/nomanifest/manifest.json"):
        resolve_shards(f"{server}/nomanifest/{{00000..00003}}.tar")
    with pytest.raises(UserError, match=r"no shard manifest at pipe:cat .*/nomanifest/manifest.json \(exit 1: "):
        resolve_shards(pipe_cat(data["root"] / "nomanifest"))


def test_brace_range_beyond_the_manifest(data, server):
    with pytest.raises(UserError, match=rf"1 of 5 shard\(s\) are not in their manifest, e.g. "
                                        rf"{server}/train/00004.tar \(the manifest {server}/train/manifest.json "
                                        rf"lists 4\)"):
        resolve_shards(f"{server}/train/{{00000..00004}}.tar")
    with pytest.raises(UserError, match=r"1 of 5 shard\(s\) are not in their manifest"):
        resolve_shards(f"pipe:cat {data['root']}/train/{{00000..00004}}.tar")


def test_manifest_listing_a_shard_the_server_lacks(server):
    with pytest.raises(UserError, match=rf"shard {server}/partial/00003.tar is listed .* \(HTTP 404"):
        resolve_shards(f"{server}/partial/")


def test_manifest_total_disagreeing_with_its_shards(server):
    with pytest.raises(UserError, match=rf"{server}/badcount/manifest.json: 'samples' does not equal the sum"):
        resolve_shards(f"{server}/badcount/{{00000..00001}}.tar")


def test_unsupported_scheme_and_pipe_without_tar_name():
    with pytest.raises(UserError, match=r"s3:// is not read directly.*pipe:aws s3 cp"):
        resolve_shards("s3://bucket/train/")
    with pytest.raises(UserError, match=r"must name its shard file"):
        resolve_shards("pipe:my-reader --split train")


# ----------------------------------------------------------------------------- config validation and the CLI

def test_validation_keeps_urls_and_reads_their_manifest(server):
    cfg = load_config(None, [f"data.root={server}"])
    assert split_path(cfg, "train") == f"{server}/train/"   # not a path under the working directory
    validate_paths(cfg, "finetune")
    bad = load_config(None, [f"data.train={server}/nomanifest/", "data.synthetic={}"])
    with pytest.raises(UserError, match=rf"config 'data.train' = {server}/nomanifest/: no shard manifest at "
                                        rf"{server}/nomanifest/manifest.json"):
        validate_paths(bad, "pretrain")
    with pytest.raises(UserError, match=r"config 'pretrain.sources\[0\].shards'"):
        check_shards_exist(f"{server}/train/{{00000..00009}}.tar", "pretrain.sources[0].shards")


def test_cli_exits_2_with_one_line(server, capsys):
    from pipeline.cli import main
    url = f"http://127.0.0.1:{_free_port()}/train/"
    assert main("pretrain", ["--print-config", "--set", f"data.train={url}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: config 'data.train' = ") and f"cannot reach {url}" in err[0]


def test_tokenizer_cache_key_keeps_the_url(server):
    from pipeline.config import DEFAULT_CACHE
    from pipeline.train.build import tokenizer_path
    cfg = load_config(None, [f"data.root={server}"])
    path = tokenizer_path(cfg, [split_path(cfg, "train")])
    assert path.parent == DEFAULT_CACHE / "tokenizers" and "http:" not in str(path)
