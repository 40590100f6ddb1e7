"""Pure torch models of relalign: image encoders, the single-stream transformer, heads, IAIS/ISD."""
from .config import ConfigError, ImageEncoderConfig, ModelConfig
from .iais import iais_loss, isd, isd_annotated
from .image_encoder import ImageTokens
from .registry import create_model, list_presets
from .retrieval import EncoderOutput, RetrievalModel
from .uniter_import import load_uniter_checkpoint

__all__ = ["ConfigError", "ImageEncoderConfig", "ModelConfig", "ImageTokens", "create_model", "list_presets",
           "EncoderOutput", "RetrievalModel", "load_uniter_checkpoint", "iais_loss", "isd", "isd_annotated"]
