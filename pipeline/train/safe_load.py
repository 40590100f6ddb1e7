"""The one way the project reads torch pickles: ``torch.load(weights_only=True)`` with an explicit allow-list
of the few classes DeepSpeed's checkpoints hold, so no file can run code on load. A refused or unreadable
file is a one-line UserError naming it.

DeepSpeed's own reads go through :class:`SafeCheckpointEngine` (engine resume, ``load_module_only``) and,
where DeepSpeed calls ``torch.load`` directly (zero_to_fp32 consolidation), through
:func:`forced_weights_only`, which makes every ``torch.load`` of the block weights-only.
"""
from __future__ import annotations

import contextlib
import enum
import functools
import os
import pickle
import re
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

from pipeline.errors import UserError

REFUSED = "only tensors, plain Python values and DeepSpeed's checkpoint types are loaded"


@functools.lru_cache(maxsize=1)
def deepspeed_checkpoint_types() -> tuple[type, ...]:
    """Classes DeepSpeed 0.19 pickles into its checkpoints beyond tensors and plain values (found by loading
    real ZeRO 0/1/2/3 fp32 and bf16 checkpoints with weights_only=True): the ZeRO stage enum, the loss scaler
    state (static; dynamic under fp16) and the optimizer-state fragment addresses. All are plain value
    holders: unpickling them sets attributes and calls nothing else."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address


def enum_member(cls, name: str):
    """Stands in for ``builtins.getattr`` while unpickling: some Python 3.11 releases (Debian 12's 3.11.2; not
    3.11.7) pickle an enum member as ``getattr(EnumClass, "NAME")`` instead of ``EnumClass(value)``. Only a
    member of an allowed enum is returned; any other use of getattr is refused."""
    if isinstance(cls, type) and issubclass(cls, enum.Enum) and cls in deepspeed_checkpoint_types() \
            and isinstance(name, str) and name in cls.__members__:
        return cls[name]
    raise pickle.UnpicklingError(f"getattr({getattr(cls, '__qualname__', cls)!r}, {name!r}) is not a member of an "
                                 f"allowed enum: refused")


def allowed_globals() -> list:
    """What torch's weights_only unpickler may build beyond its defaults (``safe_globals`` entries)."""
    return [*deepspeed_checkpoint_types(), (enum_member, "builtins.getattr")]


def load(path, map_location="cpu", mmap: Optional[bool] = None):
    """The object saved in ``path``; UserError when it holds anything outside the allow-list or is unreadable."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    with torch.serialization.safe_globals(allowed_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as exc:
            raise UserError(refusal(path, exc)) from None
        except (EOFError, RuntimeError, ValueError, OSError) as exc:
            raise UserError(f"{path}: not a readable torch checkpoint ({first_line(exc)})") from None


def refusal(path: Path, exc: Exception) -> str:
    found = _refused_globals(path) or [_global_named_in(exc)]
    return f"{path}: refused to load: it contains {', '.join(found)} which could run code; {REFUSED}"


def _refused_globals(path: Path) -> list[str]:
    """The globals of ``path`` outside torch's defaults and our allow-list (read from the pickle opcodes,
    nothing is executed)."""
    allowed = {entry[1] if isinstance(entry, tuple) else f"{entry.__module__}.{entry.__qualname__}"
               for entry in allowed_globals()}
    try:
        return [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in allowed]
    except Exception:   # a pickle too odd to scan: the unpickler's own words name the culprit
        return []


def _global_named_in(exc: Exception) -> str:
    match = re.search(r"GLOBAL (\S+)", str(exc))
    return match.group(1) if match else "an object"


def first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:200]


# ----------------------------------------------------------------------------- DeepSpeed's own reads

class SafeCheckpointEngine(CheckpointEngine):
    """DeepSpeed's checkpoint engine for everything but loading, which goes through :func:`load`; a failed
    write (disk full) is kept in ``write_error`` instead of raised, so this rank still reaches DeepSpeed's
    closing barrier and the ranks can agree that the checkpoint failed (pipeline.train.checkpoint)."""

    def __init__(self, inner: CheckpointEngine):
        super().__init__()
        self.inner = inner
        self.name = f"Safe{inner.name}"
        self.write_error: Optional[str] = None

    def load(self, path: str, map_location=None):
        return load(path, map_location=map_location if map_location is not None else "cpu")

    def create(self, info):
        return self.inner.create(info)

    def save(self, state_dict, path: str):
        try:
            return self.inner.save(state_dict, path)
        except (OSError, RuntimeError) as exc:
            if self.write_error is None:
                self.write_error = f"{path}: {str(exc).splitlines()[-1] if str(exc) else type(exc).__name__}"
            return None

    def take_write_error(self) -> Optional[str]:
        error, self.write_error = self.write_error, None
        return error

    def makedirs(self, path, exist_ok=False):
        return self.inner.makedirs(path, exist_ok=exist_ok)

    def commit(self, info):
        return self.inner.commit(info)

    def is_data_parallel_writer(self, dp_rank):
        return self.inner.is_data_parallel_writer(dp_rank)

    def is_decoupled(self):
        return self.inner.is_decoupled()

    def set_commit_info(self, info):
        return self.inner.set_commit_info(info)

    def get_commit_info(self):
        return self.inner.get_commit_info()

    def cleanup(self):
        return self.inner.cleanup()

    def preserves_storage_sharing(self):
        return self.inner.preserves_storage_sharing()


def use_safe_loading(engine) -> None:
    """Route every checkpoint read of a DeepSpeed engine through :func:`load`."""
    if not isinstance(engine.checkpoint_engine, SafeCheckpointEngine):
        engine.checkpoint_engine = SafeCheckpointEngine(engine.checkpoint_engine)


_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_FORCE_NOT = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


@contextlib.contextmanager
def forced_weights_only(files: Iterable[Path]) -> Iterator[None]:
    """Every ``torch.load`` inside the block is weights-only with our allow-list, even one that passes
    ``weights_only=False`` (torch's documented override variable, set for the block only): for DeepSpeed
    code that calls ``torch.load`` itself. ``files``: what the block may read, to name the refused one."""
    saved = {name: os.environ.get(name) for name in (_FORCE, _FORCE_NOT)}
    os.environ[_FORCE] = "1"
    os.environ.pop(_FORCE_NOT, None)
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            yield
    except pickle.UnpicklingError as exc:
        culprits = [f for f in files if _refused_globals(Path(f))]
        raise UserError(refusal(Path(culprits[0]), exc) if culprits else
                        f"refused to load a checkpoint file: {first_line(exc)}; {REFUSED}") from None
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
