"""Model loading (embedded GGUF, random test models, user weights)."""

from palign.models.loading import (
    LoadedModel,
    ModelLoadError,
    load_gguf_package,
    load_pretrained,
    load_random,
)

__all__ = ["LoadedModel", "ModelLoadError", "load_gguf_package", "load_pretrained", "load_random"]
