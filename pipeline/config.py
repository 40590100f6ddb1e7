"""Typed experiment configuration: YAML file + ``--set a.b=value`` overrides, validated once.

Division of labour with the DeepSpeed JSON (the single source of batch size, gradient accumulation,
clipping, optimizer and scheduler):

* the experiment config never *redefines* those; its ``train.micro_batch_size``, ``train.grad_accum``,
  ``train.lr`` and ``train.warmup_steps`` default to ``"auto"``, which means "whatever the DeepSpeed JSON says";
* a DeepSpeed JSON value may itself be ``"auto"``, which means "fill in from the experiment config"
  (the ds_configs/ shipped here do that for batch size, lr and warmup, so one JSON serves every experiment);
* when both give a number they must agree, otherwise start-up fails with one line (exit 2);
* when both say ``"auto"`` start-up fails too (nobody defined the value), except for gradient clipping (1.0)
  and the scheduler type (cosine), which have project defaults.
The scheduler's ``total_num_steps`` always comes from ``train.steps``. ``bf16.enabled: "auto"`` is resolved
once, in :func:`resolve_ds_config`, from the accelerator: bf16 on a GPU that supports it, fp32 on CPU.

The whole schema lives here (data, model, train, finetune, pretrain, eval, tracking, checkpoint, and the
synthetic data's section) with every check, importing nothing of torch and no pipeline module but errors
(and, when a split's manifest is counted, the manifest reader of pipeline.data.shards).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from pipeline.errors import UserError

Auto = Literal["auto"]
ALIGNMENTS = ("singular", "distributed", "congruence")   # IAIS alignments (models.iais.ALIGNMENTS)
SIDES = ("L", "V")                                       # ISD sides reported by evaluation
ZERO_STAGES = (0, 1, 2, 3)
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO_ROOT / ".cache" / "relalign"


SYNTHETIC_SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
SYNTHETIC_COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SYNTHETIC_GAP = 2   # min pixels between object boxes


def _opt(default, help_text: str):
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class SyntheticConfig:
    """Everything that determines the synthetic dataset (stored in ``<root>/dataset.json``)."""

    seed: int = _opt(0, "random seed; the same seed gives byte-identical shards")
    train: int = _opt(5000, "images in the train split")
    val: int = _opt(250, "images in the val split")
    test: int = _opt(250, "images in the test split (pairs of relation-swapped images)")
    relations: int = _opt(400, "relation-swap quadruples (pairs of images) in the relations split")
    image_size: int = _opt(96, "image width = height in pixels")
    min_objects: int = _opt(2, "fewest objects per image (>= 2)")
    max_objects: int = _opt(4, "most objects per image")
    captions_per_image: int = _opt(5, "captions per image")
    attribute_captions: int = _opt(1, "of those, captions that only list objects (the rest name a relation)")
    shapes: tuple[str, ...] = _opt(SYNTHETIC_SHAPES, "shapes to draw")
    colors: tuple[str, ...] = _opt(SYNTHETIC_COLORS, "colours to use")
    small_frac: float = _opt(0.17, "side of a small object as a fraction of image_size")
    large_frac: float = _opt(0.27, "side of a large object as a fraction of image_size")
    color_jitter: int = _opt(12, "max per-channel deviation from the named colour")
    jpeg_quality: int = _opt(95, "JPEG quality of the stored images")
    shard_samples: int = _opt(500, "images per tar shard")

    def __post_init__(self) -> None:
        object.__setattr__(self, "shapes", tuple(self.shapes))
        object.__setattr__(self, "colors", tuple(self.colors))
        _validate_synthetic(self)

    def side(self, size_index: int) -> int:
        return max(6, round((self.small_frac, self.large_frac)[size_index] * self.image_size))

    def count(self, split: str) -> int:
        """Images in ``split``."""
        counts = {"train": self.train, "val": self.val, "test": self.test, "relations": 2 * self.relations}
        return counts[split]

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict) -> "SyntheticConfig":
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise UserError(f"synthetic config: unknown field(s) {', '.join(unknown)}")
        return cls(**data)


def _validate_synthetic(cfg: SyntheticConfig) -> None:
    def bad(field_name: str, why: str) -> UserError:
        return UserError(f"synthetic config: {field_name}={getattr(cfg, field_name)!r} {why}")

    for name in ("seed", "train", "val", "test", "relations"):
        if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 0:
            raise bad(name, "must be an integer >= 0")
    if not 32 <= cfg.image_size <= 1024:
        raise bad("image_size", "must be in 32..1024")
    if not 2 <= cfg.min_objects <= cfg.max_objects:
        raise bad("min_objects", f"must be >= 2 and <= max_objects ({cfg.max_objects})")
    if not cfg.shapes or len(set(cfg.shapes)) != len(cfg.shapes) or set(cfg.shapes) - set(SYNTHETIC_SHAPES):
        raise bad("shapes", f"must be distinct names from {', '.join(SYNTHETIC_SHAPES)}")
    if not cfg.colors or len(set(cfg.colors)) != len(cfg.colors) or set(cfg.colors) - set(SYNTHETIC_COLORS):
        raise bad("colors", f"must be distinct names from {', '.join(SYNTHETIC_COLORS)}")
    if cfg.max_objects > len(cfg.shapes) * len(cfg.colors):
        raise bad("max_objects", "exceeds the number of distinct (shape, colour) pairs")
    if not 0.05 <= cfg.small_frac < cfg.large_frac <= 0.4:
        raise bad("small_frac", f"and large_frac={cfg.large_frac} need 0.05 <= small < large <= 0.4")
    if cfg.max_objects * (cfg.side(1) + SYNTHETIC_GAP) ** 2 > 0.4 * cfg.image_size ** 2:
        raise bad("max_objects", "large objects do not fit the image: lower it or large_frac")
    if cfg.side(0) + SYNTHETIC_GAP > (cfg.image_size - cfg.side(0) - 1) // 2:
        raise bad("small_frac", "two small objects do not fit in one half of the image: lower it")
    if cfg.captions_per_image < 1:
        raise bad("captions_per_image", "must be >= 1")
    if not 0 <= cfg.attribute_captions < cfg.captions_per_image:
        raise bad("attribute_captions", f"must be in 0..captions_per_image-1 ({cfg.captions_per_image - 1})")
    if not 0 <= cfg.color_jitter <= 30:
        raise bad("color_jitter", "must be in 0..30")
    if not 1 <= cfg.jpeg_quality <= 100:
        raise bad("jpeg_quality", "must be in 1..100")
    if cfg.shard_samples < 1:
        raise bad("shard_samples", "must be >= 1")


@dataclass
class TrackingConfig:
    enabled: bool = True
    # None: $MLFLOW_TRACKING_URI if set, else the local store sqlite:///<output_dir>/mlflow.db
    # (artifacts next to it in <output_dir>/mlartifacts).
    tracking_uri: str | None = None
    experiment_name: str = "relalign"
    run_name: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    queue_size: int = 10000          # pending log calls before the oldest metrics are spooled
    http_timeout_s: int = 5          # MLFLOW_HTTP_REQUEST_TIMEOUT (whole seconds, MLflow reads an int)
    http_max_retries: int = 0        # MLFLOW_HTTP_REQUEST_MAX_RETRIES
    retry_interval_s: float = 30.0   # pause after a failed call before talking to the server again
    close_timeout_s: float = 60.0    # bound on the final flush (artifacts included)
    # what cannot be sent (server down or hanging, queue full) goes to <output_dir>/mlflow_spool.jsonl and is
    # replayed into the run when the server answers again (or: python -m pipeline.tracking replay FILE); False: dropped
    spool: bool = True
    # each node's first rank samples CPU/memory/GPU into system/node<k>/... every this many seconds; 0: off
    system_metrics_interval_s: float = 10.0

    def validate(self, where: str = "tracking") -> None:
        positive = {"queue_size": self.queue_size, "http_timeout_s": self.http_timeout_s,
                    "close_timeout_s": self.close_timeout_s}
        for name, value in positive.items():
            if value <= 0:
                raise UserError(f"{where}.{name}: must be > 0, got {value!r}")
        for name in ("http_max_retries", "retry_interval_s", "system_metrics_interval_s"):
            if getattr(self, name) < 0:
                raise UserError(f"{where}.{name}: must be >= 0, got {getattr(self, name)!r}")
        if not self.experiment_name.strip():
            raise UserError(f"{where}.experiment_name: must not be empty; name the MLflow experiment")


@dataclass
class SourceConfig:
    """One pretraining shard source and its mixing weight (UNITER mixes COCO, VG, CC, SBU)."""
    shards: str = ""
    weight: float = 1.0


@dataclass
class DataConfig:
    root: Optional[str] = None            # dataset root holding train/ val/ test/ (synthetic: built here)
    synthetic: Optional[SyntheticConfig] = None
    train: Optional[str] = None           # shards: directory, manifest.json or brace pattern; default <root>/train
    val: Optional[str] = None
    test: Optional[str] = None
    relations: Optional[str] = None       # relation-swap quadruples (Winoground scores at test time); default
                                          # <root>/relations when that exists (the synthetic data writes it)
    tokenizer: Optional[str] = None       # .model (SentencePiece) or vocab .txt; None: train one into the cache
    vocab_size: int = 1000
    image_size: int = 64
    max_text_len: int = 32
    num_workers: int = 1
    shuffle_buffer: int = 500
    resampled: bool = False
    image_mode: Literal["patch", "roi", "features"] = "patch"
    max_regions: int = 36


@dataclass
class ModelConfigRef:
    preset: str = "tiny"                  # models/presets/<preset>.json, or a path to a model config.json
    overrides: dict = field(default_factory=dict)   # ModelConfig fields, passed to models.create_model
    init: Optional[str] = None            # save_pretrained dir, DeepSpeed checkpoint dir or UNITER .pt
    # a pretraining experiment YAML whose exported model initialises this run: pretrained on first use (its
    # run_dir/model, which start-up writes into init), reused while its config is unchanged. Exclusive with init.
    # Relative in a YAML file: beside that file.
    pretrain_config: Optional[str] = None


@dataclass
class TrainConfig:
    steps: int = 1000                     # optimizer steps (the scheduler's total_num_steps)
    micro_batch_size: Union[int, Auto] = "auto"   # per rank; "auto": from the DeepSpeed JSON
    grad_accum: Union[int, Auto] = "auto"
    lr: Union[float, Auto] = "auto"
    warmup_steps: Union[int, Auto] = "auto"
    # "auto" here and in the DeepSpeed JSON: cosine decay / clipping at 1.0; "linear" decays to 0 (UNITER/IAIS)
    lr_schedule: Union[Literal["cosine", "linear"], Auto] = "auto"
    grad_clip: Union[float, Auto] = "auto"
    decay_bias_and_norm: bool = False     # False: biases and LayerNorm weights get no weight decay (UNITER, BERT)
    log_every: int = 10
    val_every: int = 0                    # 0: validate only at the end
    threads: int = 0                      # torch threads per rank; 0: cores / local ranks
    nonfinite: Literal["stop", "skip"] = "stop"    # a NaN/Inf loss: stop before the update, or skip that step
    collective_timeout_s: Optional[float] = None   # process-group timeout; None: $DEEPSPEED_TIMEOUT min, else 10 min


@dataclass
class IaisConfig:
    alignment: Literal["none", "singular", "distributed", "congruence"] = "singular"
    side: Literal["alternate", "L", "V", "both"] = "alternate"
    # w in: loss = sum over directions of mean hinge + w * s(t) * sum over sides of IAIS. 8 is the authors'
    # balance (per anchor they add rank.mean() / train_batch_size + s(t) * IAIS, train_batch_size = 8)
    weight: float = 8.0
    schedule: Literal["exp", "linear", "log", "const"] = "exp"
    layers: list = field(default_factory=lambda: [-1])


# The pool is a preallocated ring buffer (pipeline.train.negatives): its size is fixed and stated here.
POOL_SIZE_HELP = (
    "recently streamed samples kept as hard-negative candidates (rounded up to whole micro-batches). The pool is "
    "preallocated per rank at pipeline.train.negatives.pool_bytes(cfg) = rows x (8 + 25 x data.max_text_len + "
    "image) bytes, image = 12 x data.image_size^2 (patch), + data.max_regions x 45 (roi), or data.max_regions x "
    "(4 x feat_dim + 29) (features): demo_tiny.yaml 24.6 MiB, coco_base.yaml 3.14 GiB")


@dataclass
class FinetuneConfig:
    negative_size: int = 31               # candidates scored without gradients per anchor
    hard_size: int = 3                    # highest-scoring candidates kept per anchor
    margin: float = 0.2
    pool_size: int = _opt(1024, POOL_SIZE_HELP)
    # both (the reference): text-anchored groups (one text, hard images) and image-anchored groups every step;
    # alternate: text-anchored on even steps, image-anchored on odd steps (half the cost); text / image: one kind
    directions: Literal["alternate", "both", "text", "image"] = "both"
    itc_preselect: int = 0                # >0: draw this many pool candidates and cross-score only the
                                          # negative_size of them most similar by ITC (negative_size
                                          # == hard_size: those are kept without cross-scoring)
    hard_start_step: int = 0              # before this step negatives are random pool candidates (a curriculum
                                          # for models without a pretrained start; mining costs nothing then)
    bce_weight: float = 0.0               # + w * BCE(sigmoid(rank) of positives -> 1, negatives -> 0): keeps a
                                          # model trained from scratch out of the all-scores-low collapse
    itc_weight: float = 0.0               # + w * in-batch ITC loss: keeps the dual-encoder shortlist of two-stage
                                          # retrieval (and itc_preselect) trained while the cross-encoder is tuned
    init_rank_from_itm: bool = True
    swap_negatives: bool = False          # relation- and attribute-swapped captions (made from the word->object
                                          # annotations) as hard negatives of their image
    grounding_weight: float = 0.0         # + w * the grounding loss of pretraining, on the positive pairs
    iais: IaisConfig = field(default_factory=IaisConfig)


@dataclass
class GroundingConfig:
    """The supervised grounding loss, as pretraining's task and fine-tuning's term both compute it (the
    ``grounding`` section): attention_weight * (pull of the annotated words' attention at layer 0 onto their
    object's image token) + regression_weight * (their output tokens' error on the object's centre, L1 or
    MSE). The main job uses the regression alone: with the attention pull the centres were not learnt at all
    (README "What the main job does")."""
    attention_weight: float = 1.0
    regression: Literal["l1", "mse"] = "l1"
    regression_weight: float = 1.0

    @property
    def needs_attention(self) -> bool:
        return self.attention_weight > 0


@dataclass
class PretrainTasks:
    mlm: float = 1.0
    itm: float = 1.0
    itc: float = 1.0
    mrfr: float = 0.0                     # region modes only
    wra: float = 0.0                      # word-region alignment (UNITER's optimal transport, IPOT)
    grounding: float = 0.0                # annotated words predict their object's box centre (needs word_objects)


@dataclass
class PretrainConfig:
    tasks: PretrainTasks = field(default_factory=PretrainTasks)
    mlm_prob: float = 0.15
    mrfr_prob: float = 0.15               # share of regions masked for MRFR
    swap_negatives: bool = False          # ITM: half the negatives become the caption's relation/attribute swap
                                          # with its own image (where the annotations can make one); with
                                          # itm_loss bce: every caption's swap is one more negative
    # ce: UNITER's two-class ITM on one pair per caption (half of them another image); bce: the match logit of
    # each caption with its own image (1) and with itm_other_images other images of the batch (0), by BCE
    itm_loss: Literal["ce", "bce"] = "ce"
    itm_other_images: int = 3
    # sample: one task per step drawn by the ratios (UNITER); sum: every task with a ratio on every step, the
    # losses weighted by the ratios (more signal per step for small models that must learn several skills)
    task_mix: Literal["sample", "sum"] = "sample"
    sources: list[SourceConfig] = field(default_factory=list)   # empty: data.train with weight 1


@dataclass
class EvalConfig:
    """What to evaluate and with which batch sizes (the ``eval`` section, launch/evaluate.py, bench/eval.py).

    score_batch: (text, image) pairs per cross-encoder forward. encode_batch: images per
    encode_image call and texts/images per ITC embedding call. image_block: images whose backbone
    tokens a rank holds at once in full retrieval (bounds memory; each image is still encoded once).
    two_stage_k: images shortlisted per
    text query by the ITC dual encoder (16 demo, 128 as ALBEF on Flickr30k); two_stage_k_texts:
    texts shortlisted per image query (None: the same k, as ALBEF). isd_max_pairs: matched pairs
    used for ISD/ISDa (evenly spaced over the captions; None = all). pictures: how many pairs /
    queries get a PNG (0 = none).
    """

    full: bool = True
    two_stage: bool = False               # the ITC shortlist needs a model trained with ITC
    score_batch: int = 512
    encode_batch: int = 64
    image_block: int = 1024
    two_stage_k: int = 16
    two_stage_k_texts: int | None = None
    isd_alignments: tuple[str, ...] = ALIGNMENTS
    isd_sides: tuple[str, ...] = SIDES
    isd_layer: int = -1
    isd_max_pairs: int | None = 256
    winoground: bool = True
    pictures: int = 4
    progress: bool = False
    val_max_images: int = 0               # validation on the first N images only (0: all)
    val_captions_per_image: int = 0       # validation with the first K captions of each image (0: all)
    test: bool = True                     # final test evaluation with the best checkpoint's weights

    def __post_init__(self) -> None:
        for name in ("score_batch", "encode_batch", "image_block", "two_stage_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"eval.{name}={value!r}: give a positive int")
        if self.two_stage_k_texts is not None and (not isinstance(self.two_stage_k_texts, int)
                                                   or self.two_stage_k_texts < 1):
            raise UserError(f"eval.two_stage_k_texts={self.two_stage_k_texts!r}: give a positive int or null")
        if self.isd_max_pairs is not None and (not isinstance(self.isd_max_pairs, int)
                                               or self.isd_max_pairs < 0):
            raise UserError(f"eval.isd_max_pairs={self.isd_max_pairs!r}: give an int >= 0 or null (all)")
        self.isd_alignments = tuple(self.isd_alignments)
        self.isd_sides = tuple(self.isd_sides)
        bad = [a for a in self.isd_alignments if a not in ALIGNMENTS]
        if bad:
            raise UserError(f"eval.isd_alignments contains {bad}: use any of {list(ALIGNMENTS)}")
        bad = [s for s in self.isd_sides if s not in SIDES]
        if bad:
            raise UserError(f"eval.isd_sides contains {bad}: use any of {list(SIDES)}")
        for name in ("pictures", "val_max_images", "val_captions_per_image"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise UserError(f"eval.{name}={value!r}: give an int >= 0")


@dataclass
class CheckpointConfig:
    every: int = 0                        # DeepSpeed checkpoint every N steps (0: only at the end)
    resume: Union[bool, Auto, str] = False   # True/"auto": continue from <run_dir>/checkpoints latest; or a dir
    export: bool = True                   # consolidated fp32 save_pretrained dir at the end
    keep_best: bool = True                # keep the best validation model (by rsum) as <run_dir>/best
    ignore_config_change: bool = False    # resume even if the training-relevant config differs from the checkpoint's


@dataclass
class ExperimentConfig:
    name: str = "relalign"
    seed: int = 0
    run_dir: str = "runs/relalign"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfigRef = field(default_factory=ModelConfigRef)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    grounding: GroundingConfig = field(default_factory=GroundingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


# ----------------------------------------------------------------------------- typed conversion

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _type_name(tp) -> str:
    if _is_union(tp):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is Literal:
        return "one of " + "|".join(str(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp, where: str):
    """Return ``value`` as type ``tp`` or raise UserError naming ``where``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None and where:
            return tp()
        if not isinstance(value, dict):
            raise UserError(f"config '{where}' must be a mapping, got {value!r}")
        return _build(tp, value, where)
    if _is_union(tp):
        real = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(real) < len(typing.get_args(tp)):   # null for an Optional: None, not X()
            return None
        if value is not None and len(real) == 1:   # Optional[X]: X's own, more precise error
            return _convert(value, real[0], where)
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, where)
            except UserError:
                continue
        raise UserError(f"config '{where}' = {value!r} has the wrong type: expected {_type_name(tp)}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise UserError(f"config '{where}' = {value!r} is not {_type_name(tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise UserError(f"config '{where}' = {value!r}: expected null")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config '{where}' = {value!r} has the wrong type: expected a list")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        return tuple(_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is list or tp is list:
        if not isinstance(value, list):
            raise UserError(f"config '{where}' = {value!r} has the wrong type: expected a list")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"config '{where}' = {value!r} has the wrong type: expected a mapping")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):   # PyYAML reads "5e-5" as a string
            return float(value)
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise UserError(f"config '{where}' = {value!r} has the wrong type: expected {_type_name(tp)}")


def _build(cls, raw: dict, where: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in hints:
            full = f"{where}.{key}" if where else key
            raise UserError(f"config key '{full}' is unknown; known keys{' under ' + repr(where) if where else ''}: "
                            f"{', '.join(names)}")
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}" if where else k) for k, v in raw.items()}
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# Keys that change what is logged, evaluated or saved, not what is trained: a resume may change them.
_NOT_TRAINING = ("name", "run_dir", "tracking.", "eval.", "checkpoint.", "train.log_every", "train.val_every",
                 "train.threads", "data.num_workers", "data.val", "data.test", "data.relations")


def training_fingerprint(cfg: ExperimentConfig) -> dict[str, Any]:
    """The flattened config keys that determine the training trajectory (JSON-safe), for resume checks."""
    flat = flatten(to_dict(cfg))
    return {k: json.loads(json.dumps(v, default=str)) for k, v in sorted(flat.items())
            if not any(k == n or (n.endswith(".") and k.startswith(n)) for n in _NOT_TRAINING)}


def fingerprint_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key: saved -> current' for every key whose value differs or exists on one side only, except a key
    newer than ``saved`` (added to the schema since it was written) that is at its default now."""
    defaults = training_fingerprint(ExperimentConfig())

    def changed(k: str) -> bool:
        if k not in saved:
            return k not in defaults or current[k] != defaults[k]
        return k not in current or saved[k] != current[k]

    def shown(d: dict, k: str) -> str:
        return repr(d[k]) if k in d else "(absent)"
    return [f"{k}: {shown(saved, k)} -> {shown(current, k)}" for k in sorted(set(saved) | set(current)) if changed(k)]


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


# ----------------------------------------------------------------------------- loading

class DuplicateKey(yaml.YAMLError):
    """A mapping names one key twice (PyYAML would keep the last value without a word)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    pass


def _unique_key_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict:
    first_line: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key == "<<":   # a merge key: what it merges may be overridden
            continue
        line = key_node.start_mark.line + 1
        if key in first_line:
            raise DuplicateKey(f"key {key!r} appears twice (lines {first_line[key]} and {line})")
        first_line[key] = line
    loader.flatten_mapping(node)
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_key_mapping)


def load_yaml(text: str):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (DuplicateKey)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise UserError(f"config file {path} {what}; pass an existing YAML file to --config")
    try:
        raw = load_yaml(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise UserError(f"config file {path} is not UTF-8 text (byte {exc.start}): save it as UTF-8") from None
    except DuplicateKey as exc:
        raise UserError(f"config file {path}: {exc}; keep one of them") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        raise UserError(f"config file {path} is not valid YAML{at}: fix its syntax") from None
    if not isinstance(raw, dict):
        raise UserError(f"config file {path} must hold a mapping of sections (data:, model:, train:, ...)")
    return raw


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one ``a.b.c=value`` (value parsed as YAML) to the nested dict ``raw``."""
    if "=" not in assignment:
        raise UserError(f"--set {assignment!r} must look like section.key=value (e.g. train.steps=200)")
    key, text = assignment.split("=", 1)
    key = key.strip()
    try:
        value = load_yaml(text) if text.strip() else None
    except DuplicateKey as exc:
        raise UserError(f"--set {assignment!r}: {exc}; keep one of them") from None
    except yaml.YAMLError:
        raise UserError(f"--set {assignment!r}: the value is not valid YAML") from None
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            raise UserError(f"--set {assignment!r}: '{part}' is a value, not a section")
        node = node[part]
    node[parts[-1]] = value


def load_config(path: Optional[str | Path], overrides: list[str] = ()) -> ExperimentConfig:
    """Load, override and type-check an experiment config (no file-system checks; see validate_paths)."""
    raw = _read_yaml(Path(path)) if path else {}
    if path:
        _anchor_to_file(raw, Path(path))
    for assignment in overrides:
        apply_override(raw, assignment)
    cfg = _build(ExperimentConfig, raw, "")
    _check_values(cfg)
    return cfg


def _anchor_to_file(raw: dict, path: Path) -> None:
    """A relative model.pretrain_config in a YAML file names a file beside that YAML (like an include);
    given by --set it is relative to the working directory, as every other path."""
    model = raw.get("model")
    ref = model.get("pretrain_config") if isinstance(model, dict) else None
    if isinstance(ref, str) and ref and not Path(os.path.expanduser(ref)).is_absolute():
        model["pretrain_config"] = str(resolve_path(path).parent / ref)


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise UserError(msg)


def _at_least(value, low, key: str, hint: str) -> None:
    _need(value >= low, f"config '{key}' = {value!r} must be >= {low}: {hint}")


def _check_values(cfg: ExperimentConfig) -> None:
    """Every value rule that needs no file, model or accelerator (those follow in runtime.prepare)."""
    check_loader_values(cfg.data, "data.")
    _at_least(cfg.data.vocab_size, SPECIAL_TOKENS + 1, "data.vocab_size",
              f"the tokenizer holds {SPECIAL_TOKENS} special tokens and at least one word")
    _check_train(cfg.train)
    _check_finetune(cfg.finetune)
    _check_pretrain(cfg)
    _check_grounding(cfg.grounding)
    _need(not (cfg.model.init and cfg.model.pretrain_config),
          "config 'model.init' and 'model.pretrain_config' are both set: give one (pretrain_config pretrains on "
          "first use and initialises from its exported model)")
    _at_least(cfg.checkpoint.every, 0, "checkpoint.every", "save every N steps, or 0 for only at the end")
    _need(0 <= cfg.seed < 2 ** 32, f"config 'seed' = {cfg.seed} must be in 0..{2 ** 32 - 1} (numpy's seed range)")
    cfg.tracking.validate()
    _need(cfg.data.synthetic is not None or cfg.data.root is not None or cfg.data.train is not None
          or bool(cfg.pretrain.sources), "config 'data' names no data: set data.train (shards) or data.synthetic")


# The loader's value rules, one place for the data section and pipeline.data.loader.LoaderConfig:
# key -> (lowest value, what to give instead).
LOADER_MINIMUMS = {
    "image_size": (8, "give the image side in pixels"),
    "max_text_len": (3, "tokens per caption must leave room for [CLS], [SEP] and one word"),
    "num_workers": (0, "give the DataLoader workers per rank (0: read in the main process)"),
    "shuffle_buffer": (1, "give the samples held for shuffling (1: stream order)"),
    "max_regions": (1, "give the image regions kept per image"),
}
SPECIAL_TOKENS = 5   # [PAD] [UNK] [CLS] [SEP] [MASK] (pipeline.data.tokenizer.SPECIAL_PIECES)


def check_loader_values(section, prefix: str) -> None:
    """UserError naming ``<prefix><key>`` unless ``section`` (DataConfig or LoaderConfig) meets LOADER_MINIMUMS."""
    for name, (low, hint) in LOADER_MINIMUMS.items():
        _at_least(getattr(section, name), low, f"{prefix}{name}", hint)


def _check_train(tr: TrainConfig) -> None:
    _need(tr.steps > 0, f"config 'train.steps' = {tr.steps} must be > 0")
    for name in ("micro_batch_size", "grad_accum"):
        v = getattr(tr, name)
        _need(v == "auto" or v >= 1, f"config 'train.{name}' = {v} must be >= 1 or 'auto'")
    _need(tr.warmup_steps == "auto" or tr.warmup_steps >= 0,
          f"config 'train.warmup_steps' = {tr.warmup_steps} must be >= 0 or 'auto'")
    _need(tr.lr == "auto" or tr.lr > 0, f"config 'train.lr' = {tr.lr} must be > 0 or 'auto' (the DeepSpeed JSON's)")
    _at_least(tr.log_every, 1, "train.log_every", "log every N steps")
    _at_least(tr.val_every, 0, "train.val_every", "validate every N steps, or 0 for only at the end")
    _at_least(tr.threads, 0, "train.threads", "give torch threads per rank, or 0 for cores / local ranks")
    _need(tr.collective_timeout_s is None or tr.collective_timeout_s > 0,
          f"config 'train.collective_timeout_s' = {tr.collective_timeout_s} must be > 0 seconds or null")


def _check_finetune(ft: FinetuneConfig) -> None:
    _need(ft.hard_size >= 1, f"config 'finetune.hard_size' = {ft.hard_size} must be >= 1")
    _need(ft.negative_size >= ft.hard_size,
          f"config 'finetune.negative_size' = {ft.negative_size} must be >= finetune.hard_size ({ft.hard_size})")
    _need(ft.pool_size > ft.negative_size,
          f"config 'finetune.pool_size' = {ft.pool_size} must exceed finetune.negative_size ({ft.negative_size})")
    _need(ft.itc_preselect == 0 or ft.negative_size <= ft.itc_preselect < ft.pool_size,
          f"config 'finetune.itc_preselect' = {ft.itc_preselect} must be 0 (off) or in "
          f"[finetune.negative_size ({ft.negative_size}), finetune.pool_size ({ft.pool_size}))")
    _at_least(ft.margin, 0, "finetune.margin", "give the hinge margin (0.2 in the paper)")
    _at_least(ft.itc_weight, 0, "finetune.itc_weight", "give a weight, or 0 for no ITC term")
    _at_least(ft.grounding_weight, 0, "finetune.grounding_weight", "give a weight, or 0 for no grounding term")
    _at_least(ft.bce_weight, 0, "finetune.bce_weight", "give a weight, or 0 for no BCE term")
    _at_least(ft.hard_start_step, 0, "finetune.hard_start_step", "give the first step of hard negatives (0: at once)")
    _at_least(ft.iais.weight, 0, "finetune.iais.weight", "give a weight, or 0 (or iais.alignment: none) for no IAIS")
    _need(all(isinstance(x, int) and not isinstance(x, bool) for x in ft.iais.layers),
          f"config 'finetune.iais.layers' = {ft.iais.layers} must be a list of layer indices")
    _need(bool(ft.iais.layers) or ft.iais.alignment == "none",
          f"config 'finetune.iais.layers' = [] names no layer for IAIS ({ft.iais.alignment}): give layer indices "
          f"(e.g. [-1], the last) or set finetune.iais.alignment=none")


def _check_grounding(g: GroundingConfig) -> None:
    _need(min(g.attention_weight, g.regression_weight) >= 0 and g.attention_weight + g.regression_weight > 0,
          f"config 'grounding' weights must be >= 0 and not both 0, got attention_weight={g.attention_weight}, "
          f"regression_weight={g.regression_weight}")


def _check_pretrain(cfg: ExperimentConfig) -> None:
    pt = cfg.pretrain
    _need(0.0 < pt.mrfr_prob < 1.0, f"config 'pretrain.mrfr_prob' = {pt.mrfr_prob} must be in (0, 1)")
    _need(0.0 < pt.mlm_prob < 1.0, f"config 'pretrain.mlm_prob' = {pt.mlm_prob} must be in (0, 1)")
    t = pt.tasks
    ratios = dataclasses.asdict(t)
    _need(min(ratios.values()) >= 0 and sum(ratios.values()) > 0,
          f"config 'pretrain.tasks' ratios must be >= 0 and not all 0, got {ratios}")
    _need(t.mrfr == 0 or cfg.data.image_mode != "patch",
          "config 'pretrain.tasks.mrfr' needs regions: set data.image_mode to roi or features, or mrfr to 0")
    _at_least(pt.itm_other_images, 1, "pretrain.itm_other_images", "give the other images each caption meets")
    _need(pt.itm_loss == "ce" or pt.itm_other_images < cfg.train.micro_batch_size,
          f"config 'pretrain.itm_other_images' = {pt.itm_other_images} must be below train.micro_batch_size "
          f"({cfg.train.micro_batch_size}): the other images come from the same micro batch")
    for i, s in enumerate(pt.sources):
        _need(s.weight > 0, f"config 'pretrain.sources[{i}].weight' = {s.weight} must be > 0")


# ----------------------------------------------------------------------------- paths

def resolve_path(p: str | Path) -> Path:
    path = Path(os.path.expanduser(str(p)))
    return path if path.is_absolute() else Path.cwd() / path


def is_remote(spec: str) -> bool:
    """A shard spec that webdataset opens itself (a URL or a ``pipe:`` command), never a local path."""
    return spec.startswith("pipe:") or "://" in spec


def split_path(cfg: ExperimentConfig, split: str) -> Optional[str]:
    """Shards location of ``split`` (train/val/test): explicit data.<split>, else <root>/<split>."""
    explicit = getattr(cfg.data, split)
    if explicit:
        return explicit
    if cfg.data.root and is_remote(cfg.data.root):
        return cfg.data.root.rstrip("/") + f"/{split}/"   # a directory URL; never a local path
    root = data_root(cfg)
    return str(root / split) if root is not None else None


def data_root(cfg: ExperimentConfig) -> Optional[Path]:
    if cfg.data.root:
        return resolve_path(cfg.data.root)
    if cfg.data.synthetic is not None:
        import hashlib
        digest = hashlib.sha1(json.dumps(cfg.data.synthetic.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
        return DEFAULT_CACHE / f"synthetic-{digest}"
    return None


def check_layer_indices(layers: list[int], num_layers: int, what: str) -> None:
    """UserError naming ``what`` unless every index in ``layers`` is a layer of a ``num_layers``-layer model."""
    bad = [layer for layer in layers if not -num_layers <= layer < num_layers]
    if bad:
        raise UserError(f"{what}: {bad} outside the model's layers -{num_layers}..{num_layers - 1}; "
                        f"use indices within them (-1: the last)")


def check_output_dir(path: str | Path, what: str) -> None:
    """UserError naming ``what`` unless ``path`` is a directory, or can be made one, that this process can write:
    checked before the work whose results go there."""
    target = resolve_path(path)
    if target.exists() and not target.is_dir():
        raise UserError(f"{what} {path}: exists and is not a directory; give a directory (or a new path)")
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{what} {path}: {existing} is a file, not a directory; give another path")
    problem = write_probe_error(existing)
    if problem:
        raise UserError(f"{what} {path}: cannot write in {existing} ({problem}); give a directory you can write")


def write_probe_error(directory: Path) -> Optional[str]:
    """None when a file can be created (and is removed again) in ``directory``, else why not: a probe file,
    since modes say nothing for root, and a read-only mount or /proc does."""
    try:
        with tempfile.TemporaryFile(dir=directory, prefix=".relalign_write_check"):
            return None
    except OSError as exc:
        return exc.strerror or str(exc)


# ----------------------------------------------------------------------------- DeepSpeed JSON

def read_ds_config(path: str | Path) -> dict:
    p = resolve_path(path)
    if not p.is_file():
        raise UserError(f"--deepspeed_config {path}: no such file (see ds_configs/zero0..3.json)")
    try:
        ds = json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(f"--deepspeed_config {path} is not UTF-8 text (byte {exc.start}): save it as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"--deepspeed_config {path} is not valid JSON (line {exc.lineno}): fix its syntax") from None
    if not isinstance(ds, dict):
        raise UserError(f"--deepspeed_config {path} must hold a JSON object")
    return ds


def _merge(ds_value, exp_value, ds_key: str, exp_key: str, src: str, default=None):
    """One value defined by the DeepSpeed JSON and/or the experiment config ("auto" = the other one; both
    "auto": ``default`` where the value has one, else an error)."""
    ds_auto = ds_value is None or ds_value == "auto"
    exp_auto = exp_value == "auto"
    if ds_auto and exp_auto and default is not None:
        return default
    if ds_auto and exp_auto:
        raise UserError(f"{ds_key} is 'auto' in {src} and config '{exp_key}' is 'auto': set one of them")
    if ds_auto:
        return exp_value
    if exp_auto or ds_value == exp_value:
        return ds_value
    raise UserError(f"{src} sets {ds_key}={ds_value} but config '{exp_key}' = {exp_value}: "
                    f"they contradict; remove one (or make them equal)")


def resolve_ds_config(ds: dict, cfg: ExperimentConfig, world_size: int, accelerator: str,
                      src: str = "ds_config", bf16_supported: bool = False) -> dict:
    """Fill the DeepSpeed JSON's "auto" values from ``cfg`` (and vice versa) and check they agree.

    Writes the resolved micro batch size / grad accumulation / lr / warmup back into ``cfg.train`` so the
    training code reads one consistent set of numbers. Returns a new dict for ``deepspeed.initialize``.
    """
    ds = json.loads(json.dumps(ds))
    tr = cfg.train
    mbs = _merge(ds.get("train_micro_batch_size_per_gpu"), tr.micro_batch_size,
                 "train_micro_batch_size_per_gpu", "train.micro_batch_size", src)
    gas = _merge(ds.get("gradient_accumulation_steps", "auto" if tr.grad_accum != "auto" else 1), tr.grad_accum,
                 "gradient_accumulation_steps", "train.grad_accum", src)
    for key, val in (("train_micro_batch_size_per_gpu", mbs), ("gradient_accumulation_steps", gas)):
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise UserError(f"{src}: {key} = {val!r} must be a positive integer")
    ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"] = mbs, gas
    tbs = ds.get("train_batch_size", "auto")
    if tbs != "auto" and tbs != mbs * gas * world_size:
        raise UserError(f"{src} sets train_batch_size={tbs} but micro batch {mbs} x grad accumulation {gas} x "
                        f"world size {world_size} = {mbs * gas * world_size}: remove train_batch_size or fix it")
    ds.pop("train_batch_size", None)

    opt = ds.get("optimizer")
    if not isinstance(opt, dict) or str(opt.get("type", "")).lower() not in ("adamw", "adam"):
        raise UserError(f"{src}: 'optimizer' must be {{\"type\": \"AdamW\", \"params\": {{...}}}}")
    params = _json_object(opt.setdefault("params", {}), "optimizer.params", src)
    lr = _merge(params.get("lr"), tr.lr, "optimizer.params.lr", "train.lr", src)
    if not _is_number(lr) or lr <= 0:
        raise UserError(f"{src}: optimizer.params.lr = {lr!r} must be a number > 0")
    params["lr"] = float(lr)

    clip = _merge(ds.get("gradient_clipping"), tr.grad_clip, "gradient_clipping", "train.grad_clip", src,
                  default=1.0)
    if not _is_number(clip) or clip < 0:
        raise UserError(f"{src}: gradient_clipping = {clip!r} must be a number >= 0 (0: no clipping)")
    ds["gradient_clipping"] = float(clip)
    warmup = _resolve_scheduler(ds, tr, params["lr"], src)
    _resolve_precision(ds, accelerator, src, bf16_supported)
    _check_zero(ds, src)
    tr.micro_batch_size, tr.grad_accum, tr.lr, tr.warmup_steps = mbs, gas, float(lr), int(warmup)
    tr.grad_clip = float(clip)
    return ds


_SCHEDULERS = {"WarmupCosineLR": "cosine", "WarmupDecayLR": "linear"}


def _resolve_scheduler(ds: dict, tr: TrainConfig, lr: float, src: str) -> int:
    """Fill the scheduler (type "auto": from train.lr_schedule, cosine when both are auto); returns warmup."""
    sched = ds.get("scheduler")
    if sched is None:
        if tr.warmup_steps not in ("auto", 0) or tr.lr_schedule != "auto":
            raise UserError(f"config 'train.warmup_steps' / 'train.lr_schedule' are set but {src} has no "
                            f"scheduler: add one (type \"auto\")")
        return 0
    stype = sched.get("type") if isinstance(sched, dict) else None
    if stype != "auto" and stype not in _SCHEDULERS:
        raise UserError(f"{src}: scheduler.type = {stype!r}; use \"auto\", WarmupDecayLR or WarmupCosineLR")
    kind = _merge(_SCHEDULERS.get(stype, "auto"), tr.lr_schedule, f"scheduler.type ({stype})",
                  "train.lr_schedule", src, default="cosine")
    sched["type"] = {v: k for k, v in _SCHEDULERS.items()}[kind]
    sp = _json_object(sched.setdefault("params", {}), "scheduler.params", src)
    warmup = _merge(sp.get("warmup_num_steps"), tr.warmup_steps, "scheduler.params.warmup_num_steps",
                    "train.warmup_steps", src)
    if not _is_int(warmup) or warmup < 0:
        raise UserError(f"{src}: scheduler.params.warmup_num_steps = {warmup!r} must be an integer >= 0")
    # DeepSpeed's schedulers reject 0 warmup steps; 1 is their shortest warmup (they stretch it to 2 anyway)
    sp["warmup_num_steps"] = max(1, warmup)
    total = sp.get("total_num_steps", "auto")
    if total not in ("auto", None) and total != tr.steps:
        raise UserError(f"{src} sets scheduler.params.total_num_steps={total} but config 'train.steps' = "
                        f"{tr.steps}: they contradict; use \"auto\" in the JSON")
    sp["total_num_steps"] = tr.steps
    sp.setdefault("warmup_type", "linear")
    if kind == "linear":   # warmup to lr, then linear decay to 0 (UNITER's warmup_linear)
        max_lr = sp.get("warmup_max_lr", "auto")
        if max_lr not in ("auto", None) and float(max_lr) != lr:
            raise UserError(f"{src}: scheduler.params.warmup_max_lr={max_lr} differs from the lr {lr}")
        sp["warmup_max_lr"] = lr
        sp.setdefault("warmup_min_lr", 0.0)
    else:
        sp.setdefault("warmup_min_ratio", 0.0)
        sp.setdefault("cos_min_ratio", 0.01)
    if warmup > tr.steps:
        raise UserError(f"warmup steps {warmup} exceed config 'train.steps' = {tr.steps}")
    tr.lr_schedule = kind
    return warmup


def _resolve_precision(ds: dict, accelerator: str, src: str, bf16_supported: bool) -> None:
    bf16 = _json_object(ds.setdefault("bf16", {"enabled": False}), "bf16", src)
    fp16 = _json_object(ds.get("fp16", {}), "fp16", src)
    for name, section in (("bf16", bf16), ("fp16", fp16)):
        if section.get("enabled", False) not in (True, False, "auto"):
            raise UserError(f"{src}: {name}.enabled = {section['enabled']!r} must be true, false or \"auto\"")
    if bf16.get("enabled") == "auto":
        bf16["enabled"] = accelerator != "cpu" and bf16_supported
    if fp16.get("enabled") == "auto":
        fp16["enabled"] = False
    if accelerator == "cpu" and (bf16.get("enabled") is True or fp16.get("enabled") is True):
        raise UserError(f"{src} enables bf16/fp16 but this run is on CPU: set bf16.enabled to \"auto\" or false")
    if bf16.get("enabled") is True and fp16.get("enabled") is True:
        raise UserError(f"{src} enables both bf16 and fp16: keep one")


def _check_zero(ds: dict, src: str) -> None:
    zero = _json_object(ds.get("zero_optimization", {}), "zero_optimization", src)
    stage = zero.get("stage", 0)
    if not _is_int(stage) or stage not in ZERO_STAGES:
        raise UserError(f"{src}: zero_optimization.stage = {stage!r}; use one of {', '.join(map(str, ZERO_STAGES))}")


def _json_object(value, key: str, src: str) -> dict:
    """``value`` (the DeepSpeed JSON's ``key``) if it is a JSON object, else a UserError naming the key."""
    if not isinstance(value, dict):
        raise UserError(f"{src}: {key} = {json.dumps(value)} must be a JSON object ({{...}})")
    return value


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
