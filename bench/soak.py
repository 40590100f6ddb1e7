"""Soak: thousands of CPU fine-tuning steps of the tiny model on shards with corrupt samples mixed in.

Data (a temp dir): real synthetic shards (`--images` train images, 32 px, `--shard-samples` per shard) plus
`--bad-shards` extra tar shards, listed in the train manifest, that mix copies of real samples with
`--bad-per-shard` corrupt ones written here (truncated JPEG / PNG, zero-byte image, non-image bytes, invalid
JSON, JSON that is not an object, no image, empty caption, caption not UTF-8, no caption: every kind one that
pipeline/data/decode.py skips and counts). Every shard holds a multiple of the micro-batch, so an epoch is
samples / micro-batch batches.

Run: the real `pipeline.train.finetune.finetune` (one process, world size 1, gloo, DeepSpeed ZeRO 0 with
torch AdamW, tracking off, no validation / test / export), `data.num_workers` DataLoader worker processes
(forked anew every epoch). `--steps` is rounded so that the pool fill plus the steps end exactly at an epoch
boundary: then no decoded batch is still in flight when training stops, and every decoded sample's skip has
been reported.

Skips: `injected` counts how often the loader's decode actually reached an injected sample (a wrapper around
`pipeline.data.loader.decode_train_sample`, inherited by the forked workers, appends one ledger line per call
on an injected key, whatever the outcome); `skipped` is what the run itself reports: the `skipped_<reason>`
scalars of the last row of <run_dir>/metrics.jsonl (`BatchStream.skipped` is cumulative since the start of the
process, so the last row holds the totals; summing rows would over-count). A corrupt sample that decoded, a
skip lost between a worker and the metrics, or a good sample skipped all make the two differ. Every injected
sample must also reach the decoder at least once per epoch (it may come twice when a worker's last window
lost samples and was topped up from the wrapped stream).

Memory and descriptors: measured inside the loop's own per-step stop check (`finetune(..., stop=flag)`: the
loop calls `flag.is_set()` after every optimizer step but the last), at the step before the last and at the
first step from `--warmup` on (default 10% of the steps) that is at the same place in its epoch (what the
loader holds varies along an epoch: its first batch, batches a worker delivered early). Resident memory is
the PSS of this process plus its DataLoader workers (/proc/<pid>/smaps_rollup: copy-on-write pages shared
with forked workers are not counted twice), descriptors are the entries of /proc/self/fd. A sampler thread
also records both every `--interval` s for the peak and a trace. Targets: rss_growth <= 0.10, fd_growth <= 0,
skipped == injected. Last line:
RESULT rss_growth=<fraction> fd_growth=<count> skipped=<n> injected=<n>.

    .venv/bin/python bench/soak.py [--steps 2000] [--quick]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
REPO = Path(__file__).resolve().parents[1]

BAD_PREFIX = "soakbad"          # keys of the corrupt samples (the ledger's filter)
GOOD_PREFIX = "soakok"          # keys of the real samples copied into the extra shards
TINY_MODEL = ("model.overrides={hidden_size: 32, num_layers: 2, num_heads: 2, intermediate_size: 64, "
              "itc_dim: 16, dropout: 0.0, init_std: 0.1}")
RSS_TARGET, FD_TARGET = 0.10, 0
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "CROSS_RANK",
                  "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


# ----------------------------------------------------------------------------- corrupt samples

def _png_of(jpg: bytes) -> bytes:
    from PIL import Image
    out = io.BytesIO()
    Image.open(io.BytesIO(jpg)).convert("RGB").save(out, format="PNG")
    return out.getvalue()


def _json(meta: dict) -> bytes:
    return json.dumps(meta, separators=(",", ":")).encode("utf-8")


# kind -> (reason decode.py counts it under, members built from a real sample's jpg bytes and json meta)
CORRUPT_KINDS = {
    "truncated_jpeg": ("bad_image", lambda jpg, meta: {"jpg": jpg[: len(jpg) // 2], "json": _json(meta)}),
    "truncated_png": ("bad_image", lambda jpg, meta: {"png": _png_of(jpg)[: len(_png_of(jpg)) // 2],
                                                      "json": _json(meta)}),
    "zero_byte_image": ("bad_image", lambda jpg, meta: {"jpg": b"", "json": _json(meta)}),
    "not_an_image": ("bad_image", lambda jpg, meta: {"jpg": b"<html><body>403 Forbidden</body></html>\n" * 8,
                                                     "json": _json(meta)}),
    "invalid_json": ("bad_json", lambda jpg, meta: {"jpg": jpg, "json": _json(meta)[:-7]}),
    "json_not_object": ("bad_json", lambda jpg, meta: {"jpg": jpg, "json": _json(meta["captions"])}),
    "no_image": ("missing_image", lambda jpg, meta: {"json": _json(meta), "txt": meta["captions"][0].encode()}),
    "empty_caption": ("empty_caption", lambda jpg, meta: {"jpg": jpg, "json": _json({**meta, "captions": [" "]})}),
    "caption_not_utf8": ("bad_caption_encoding", lambda jpg, meta: {"jpg": jpg, "txt": b"a red \xff\xfe square"}),
    "no_caption": ("missing_caption", lambda jpg, meta: {"jpg": jpg}),
}


def read_samples(tar_path: Path) -> list[dict]:
    """The samples of one shard as {key: ..., ext: bytes}, in tar order."""
    samples: dict[str, dict] = {}
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if member.isreg():
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
    return list(samples.values())


def write_tar(path: Path, samples: list[dict]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))


def inject(train: Path, shards: int, per_shard: int, shard_samples: int) -> dict[str, str]:
    """Writes `shards` extra shards of `shard_samples` samples, `per_shard` of them corrupt (kinds in turn),
    appends them to the manifest; returns {key: reason} of the corrupt samples."""
    from pipeline.data.shards import MANIFEST_NAME, read_manifest
    manifest = read_manifest(train)
    real = [s for e in manifest["shards"] for s in read_samples(train / e["url"])]
    kinds = list(CORRUPT_KINDS)
    injected: dict[str, str] = {}
    n_bad = n_good = 0
    for index in range(shards):
        rows = []
        for slot in range(shard_samples):
            src = real[(index * shard_samples + slot) % len(real)]
            meta = json.loads(src["json"])
            if slot % max(1, shard_samples // per_shard) == 0 and sum(1 for r in rows if r["bad"]) < per_shard:
                kind = kinds[n_bad % len(kinds)]
                reason, build = CORRUPT_KINDS[kind]
                key = f"{BAD_PREFIX}_{n_bad:05d}_{kind}"
                rows.append({"bad": True, "sample": {"__key__": key, **build(src["jpg"], meta)}})
                injected[key] = reason
                n_bad += 1
            else:
                key = f"{GOOD_PREFIX}_{n_good:05d}"
                members = {ext: v for ext, v in src.items() if ext != "__key__"}
                members["json"] = _json({**meta, "image_id": key})
                rows.append({"bad": False, "sample": {"__key__": key, **members}})
                n_good += 1
        name = f"{90000 + index:05d}.tar"
        write_tar(train / name, [r["sample"] for r in rows])
        manifest["shards"].append({"url": name, "samples": len(rows), "bytes": (train / name).stat().st_size})
    manifest["samples"] = sum(e["samples"] for e in manifest["shards"])
    tmp = train / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(train / MANIFEST_NAME)
    return injected


def make_data(root: Path, args) -> tuple[Path, dict[str, str]]:
    from pipeline.data.synthetic import SyntheticConfig, ensure_synthetic_dataset
    from pipeline.data.tokenizer import SentencePieceTokenizer, iter_captions
    cfg = SyntheticConfig(seed=0, train=args.images, val=8, test=8, relations=20, image_size=32,
                          shard_samples=args.shard_samples, captions_per_image=2, attribute_captions=1,
                          max_objects=2, large_frac=0.3, small_frac=0.2)
    ensure_synthetic_dataset(root, cfg, progress=False)
    tok = root / "tok.model"
    SentencePieceTokenizer.train(iter_captions([str(root / "train")]), tok, 100)   # before the corrupt ones
    return tok, inject(root / "train", args.bad_shards, args.bad_per_shard, args.shard_samples)


# ----------------------------------------------------------------------------- the ledger

def install_ledger(path: Path) -> None:
    """Every decode of an injected sample, in whichever process, appends "<epoch> <key>" to `path`."""
    import pipeline.data.loader as loader_mod
    real = loader_mod.decode_train_sample

    def ledgered(sample, tokenizer, spec, seed, epoch):
        key = sample.get("__key__", "")
        if key.startswith(BAD_PREFIX):
            with open(path, "a", encoding="utf-8") as f:   # O_APPEND: one short line is one atomic write
                f.write(f"{epoch} {key}\n")
        return real(sample, tokenizer, spec, seed, epoch)

    loader_mod.decode_train_sample = ledgered


# ----------------------------------------------------------------------------- memory and descriptors

def _pss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


_MEASURING = threading.Lock()   # the sampler thread's own /proc reads must not show in the loop's count


def measure() -> dict:
    """Resident memory (PSS, and plain RSS) of this process and its children, open descriptors of this one."""
    with _MEASURING:
        return _measure()


def _measure() -> dict:
    import psutil
    me = psutil.Process()
    out = {"t": time.perf_counter(), "rss_main": me.memory_info().rss, "rss_all": me.memory_info().rss,
           "pss_all": (_pss_kib(me.pid) or 0) * 1024, "children": 0}
    for child in me.children(recursive=True):
        try:
            rss = child.memory_info().rss
        except psutil.Error:
            continue
        pss = _pss_kib(child.pid)
        out["rss_all"] += rss
        out["pss_all"] += rss if pss is None else pss * 1024
        out["children"] += 1
    out["fds"] = len(os.listdir("/proc/self/fd")) - 1   # less the one listdir holds
    return out


class Sampler(threading.Thread):
    def __init__(self, interval: float, flag) -> None:
        super().__init__(daemon=True)
        self.interval, self.flag, self.rows = interval, flag, []
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval):
            self.rows.append({**measure(), "step": self.flag.step})

    def stop(self) -> None:
        self._done.set()
        self.join()


def soak_flag(warmup: int, last: int):
    """A StopFlag that never stops; its is_set() (called by the loop after each step but the last) counts the
    steps and measures at steps `warmup` and `last`."""
    from pipeline.stopping import StopFlag

    class SoakFlag(StopFlag):
        def __init__(self) -> None:
            super().__init__()
            self.step, self.at = 0, {}

        def is_set(self) -> bool:
            if self.step < last:    # the finish phases call it too, after training
                self.step += 1
                if self.step in (warmup, last):
                    self.at[self.step] = measure()
            return super().is_set()

    return SoakFlag()


# ----------------------------------------------------------------------------- the run

def run_sets(root: Path, tok: Path, run_dir: Path, steps: int, args) -> list[str]:
    return [f"data.train={root / 'train'}", f"data.val={root / 'val'}", f"data.test={root / 'test'}",
            f"data.relations={root / 'relations'}", f"data.tokenizer={tok}", "data.synthetic=null",
            "data.image_size=32", "data.max_text_len=48", f"data.num_workers={args.workers}",
            f"data.shuffle_buffer={args.shuffle_buffer}", "model.preset=tiny", TINY_MODEL, "model.init=null",
            "model.pretrain_config=null", "finetune.swap_negatives=false", "finetune.grounding_weight=0.0",
            "finetune.itc_weight=0.0", f"run_dir={run_dir}", f"train.steps={steps}",
            f"train.micro_batch_size={args.batch_size}", "train.grad_accum=1", "train.lr=1e-3",
            "train.warmup_steps=10", f"train.log_every={args.log_every}", "train.threads=1", "train.val_every=0",
            "finetune.negative_size=3", "finetune.hard_size=1", "finetune.pool_size=16",
            "finetune.iais.weight=1.0", "finetune.iais.schedule=const", "eval.test=false",
            "tracking.enabled=false", "checkpoint.every=0", "checkpoint.export=false", "checkpoint.resume=false"]


def whole_epochs(train: Path, args, want_batches: int) -> tuple[int, list[int]]:
    """Batches of the whole epochs closest to `want_batches` (at least one), and each epoch's count."""
    from pipeline.data.loader import LoaderConfig, plan_epoch
    from pipeline.data.shards import resolve_shards
    shards = resolve_shards(str(train))
    lcfg = LoaderConfig(shards=str(train), batch_size=args.batch_size, image_size=32, max_text_len=48,
                        num_workers=args.workers, shuffle_buffer=args.shuffle_buffer)
    counts, total = [], 0
    while not counts or abs(total + plan_epoch(shards, lcfg, 0, 1, len(counts), 0).batches_per_epoch
                            - want_batches) < abs(total - want_batches):
        counts.append(plan_epoch(shards, lcfg, 0, 1, len(counts), 0).batches_per_epoch)
        total += counts[-1]
    return total, counts


def read_skips(run_dir: Path) -> tuple[dict[str, int], int, list[str]]:
    """Skip totals by reason (the last training row of metrics.jsonl), that row's step, and problems seen."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    problems, previous = [], {}
    for row in rows:
        now = {k[len("skipped_"):]: int(round(v)) for k, v in row.items() if k.startswith("skipped_")}
        if any(now.get(k, 0) < v for k, v in previous.items()):
            problems.append(f"skip counters went down at step {row['step']}: {previous} -> {now}")
        previous = now
    return previous, (rows[-1]["step"] if rows else 0), problems


def final_loader_state(run_dir: Path) -> dict | None:
    import torch
    files = sorted((run_dir / "checkpoints").glob("step*/relalign_rank0.pt"))
    if not files:
        return None
    try:
        return dict(torch.load(files[-1], map_location="cpu", weights_only=True).get("loader") or {})
    except Exception:   # an unreadable client file only loses this cross-check
        return None


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def main() -> None:
    try:
        run()
    except Exception:   # benchmarks always exit 0; the traceback says what broke
        traceback.print_exc()
        print("RESULT rss_growth=nan fd_growth=nan skipped=nan injected=nan")


def run() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000, help="optimizer steps (rounded to whole epochs)")
    ap.add_argument("--quick", action="store_true", help="~200 steps on less data (for tests)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="baseline step (default: 10%% of the steps), moved on to the final one's place in an epoch")
    ap.add_argument("--images", type=int, default=320, help="synthetic train images")
    ap.add_argument("--shard-samples", type=int, default=40)
    ap.add_argument("--bad-shards", type=int, default=2, help="extra shards holding corrupt samples")
    ap.add_argument("--bad-per-shard", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shuffle-buffer", type=int, default=64)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--interval", type=float, default=1.0, help="sampler thread period, seconds")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.images, args.shard_samples, args.bad_per_shard = 200, 96, 24, 10
        args.log_every = 20
    if args.shard_samples % args.batch_size:
        raise SystemExit("--shard-samples must be a multiple of --batch-size (epochs of whole batches)")
    for var in list(os.environ):   # one process of its own, whatever launcher started the shell
        if var.startswith(("SLURM_", "OMPI_", "PMI_", "TORCHELASTIC")) or var in _LAUNCHER_VARS:
            os.environ.pop(var)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        tmp = Path(tmp)
        tok, injected_keys = make_data(tmp / "data", args)
        report(tmp, tok, injected_keys, args, t0)


def report(tmp: Path, tok: Path, injected_keys: dict[str, str], args, t0: float) -> None:
    from pipeline.train.finetune import finetune
    from pipeline.train.negatives import CandidatePool
    from pipeline.train.runtime import prepare

    ds = json.loads((REPO / "ds_configs" / "zero0.json").read_text())
    ds.setdefault("optimizer", {}).setdefault("params", {})["torch_adam"] = True   # no fused Adam to compile
    (tmp / "ds.json").write_text(json.dumps(ds))
    run_dir = tmp / "run"
    sets = run_sets(tmp / "data", tok, run_dir, args.steps, args)
    cfg, _ = prepare("finetune", None, sets, str(tmp / "ds.json"))
    fill = CandidatePool.for_config(cfg, args.batch_size).capacity_batches - 1
    batches, per_epoch = whole_epochs(tmp / "data" / "train", args, args.steps + fill)
    steps = batches - fill
    # the baseline at the same place in its epoch as the final measurement (the last batch but one of an epoch):
    # what the loader holds varies along an epoch (the epoch's first batch, batches a worker delivered early)
    warmup = args.warmup or max(1, steps // 10)
    warmup = min(steps - 1, warmup + (-(warmup + fill + 1)) % per_epoch[0])
    sets = run_sets(tmp / "data", tok, run_dir, steps, args)
    cfg, ds = prepare("finetune", None, sets, str(tmp / "ds.json"))
    print(f"data: {per_epoch[0] * args.batch_size} train samples ({len(injected_keys)} corrupt in "
          f"{args.bad_shards} extra shards), {per_epoch[0]} batches of {args.batch_size} per epoch; "
          f"steps {args.steps} -> {steps} (+{fill} pool-fill batches = {len(per_epoch)} whole epochs); "
          f"baseline at step {warmup}; workers {args.workers}; ready in {time.perf_counter() - t0:.0f} s",
          flush=True)

    ledger = tmp / "ledger.txt"
    ledger.touch()
    install_ledger(ledger)
    flag = soak_flag(warmup, steps - 1)
    sampler = Sampler(args.interval, flag)
    before = measure()
    sampler.start()
    t_run = time.perf_counter()
    try:
        finetune(cfg, ds, flag)
    finally:
        sampler.stop()
    run_s = time.perf_counter() - t_run
    after = measure()

    skipped_by, last_step, problems = read_skips(run_dir)
    skipped = sum(skipped_by.values())
    lines = ledger.read_text().splitlines()
    injected = len(lines)
    seen: dict[tuple[int, str], int] = {}
    for line in lines:
        epoch, key = line.split()
        seen[(int(epoch), key)] = seen.get((int(epoch), key), 0) + 1
    missing = [(e, k) for e in range(len(per_epoch)) for k in injected_keys if (e, k) not in seen]
    twice = sum(n - 1 for n in seen.values())
    expected_by: dict[str, int] = {}
    for (_, key), n in seen.items():
        expected_by[injected_keys[key]] = expected_by.get(injected_keys[key], 0) + n
    state = final_loader_state(run_dir)

    base, final = flag.at.get(warmup), flag.at.get(steps - 1)
    if base is None or final is None:
        raise RuntimeError(f"the loop's stop check never reached step {warmup} / {steps - 1} (got {flag.step})")
    rss_growth = final["pss_all"] / base["pss_all"] - 1
    fd_growth = final["fds"] - base["fds"]
    peak = max(sampler.rows, key=lambda r: r["pss_all"], default=final)
    print(f"run: {steps} steps in {run_s:.0f} s ({steps / run_s:.1f} steps/s), last logged step {last_step}; "
          f"loader position at the final checkpoint: {state}")
    print(f"memory PSS (main + {base['children']} worker(s)): before {mib(before['pss_all'])}, step {warmup} "
          f"{mib(base['pss_all'])}, step {steps - 1} {mib(final['pss_all'])} (peak {mib(peak['pss_all'])} at step "
          f"{peak.get('step', '?')}), after the run {mib(after['pss_all'])}; main RSS {mib(base['rss_main'])} -> "
          f"{mib(final['rss_main'])}")
    trace = [r for i, r in enumerate(sampler.rows) if i % max(1, len(sampler.rows) // 8) == 0]
    print("trace (step: PSS / main RSS / fds / workers): " + ", ".join(
        f"{r['step']}: {mib(r['pss_all'])} / {mib(r['rss_main'])} / {r['fds']} / {r['children']}" for r in trace))
    print(f"descriptors: before {before['fds']}, step {warmup} {base['fds']}, step {steps - 1} {final['fds']}, "
          f"after the run {after['fds']} (child processes then: {after['children']})")
    print(f"skips reported (metrics.jsonl, last row): {dict(sorted(skipped_by.items()))}")
    print(f"injected samples reaching the decoder (ledger): {dict(sorted(expected_by.items()))} = {injected} "
          f"({len(injected_keys)} corrupt samples x {len(per_epoch)} epochs = {len(injected_keys) * len(per_epoch)}"
          f", {twice} repeat(s) within an epoch from top-up reads past the end)")
    for problem in problems:
        print(f"problem: {problem}")
    if missing:
        print(f"problem: {len(missing)} (epoch, injected sample) pairs never reached the decoder, e.g. {missing[:3]}")
    if skipped_by != expected_by:
        print(f"problem: skips by reason differ from the injected kinds: reported {dict(sorted(skipped_by.items()))}"
              f", injected {dict(sorted(expected_by.items()))}")
    checks = [(f"rss_growth <= {RSS_TARGET}", rss_growth <= RSS_TARGET, f"{rss_growth:+.4f}"),
              (f"fd_growth <= {FD_TARGET}", fd_growth <= FD_TARGET, f"{fd_growth:+d}"),
              ("skipped == injected", skipped == injected and injected > 0 and not missing,
               f"{skipped} vs {injected}")]
    for name, ok, value in checks:
        print(f"target {name}: {value} -> {'met' if ok else 'NOT met'}")
    print(f"RESULT rss_growth={rss_growth:.4f} fd_growth={fd_growth} skipped={skipped} injected={injected}")


if __name__ == "__main__":
    main()
    sys.exit(0)
