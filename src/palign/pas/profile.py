"""A subject's PAS result as a file: which heads, which directions, how far to shift.

Saved as ``<stem>.safetensors`` (tensors) plus ``<stem>.json`` (model, shape, alpha, settings,
versions), loadable and applicable to any prompt of the same model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from palign.constants import TRAITS
from palign.errors import ArtifactError, PASError
from palign.pas.heads import HeadLayout, HeadShift, head_layout

POOLED = -1  # trait index of a component that applies to every item


@dataclass
class PASProfile:
    """Shifted heads of one subject. Per component ``m``: ``layer[m]``, ``head[m]``,
    ``trait[m]`` (index into TRAITS, or -1 for all items), unit ``direction[m]`` (head_dim,),
    ``sigma[m]`` (std of activations along it), probe ``train_acc[m]``/``val_acc[m]``.
    The shift of a head is ``alpha * sigma * direction``; ``alpha`` None = not chosen yet."""

    model: str
    shape: tuple[int, int, int]
    layer: torch.Tensor
    head: torch.Tensor
    trait: torch.Tensor
    direction: torch.Tensor
    sigma: torch.Tensor
    train_acc: torch.Tensor
    val_acc: torch.Tensor
    alpha: float | None = None
    meta: dict = field(default_factory=dict)

    @property
    def per_trait(self) -> bool:
        return bool((self.trait != POOLED).any())

    def check_fits(self, layout: HeadLayout, model_name: str | None = None) -> None:
        """Refuse a model other than the profile's (by name, then by head shape)."""
        if model_name is not None and model_name != self.model:
            raise PASError(
                f"profile was made for model {self.model!r}, not {model_name!r} (pass model={self.model})"
            )
        if tuple(self.shape) != layout.shape:
            raise PASError(
                f"profile for {self.model} has heads {tuple(self.shape)} (layers, heads, head_dim); "
                f"this model has {layout.shape}"
            )

    def applied(self, loaded, alpha: float | None = None) -> HeadShift:
        """A context manager that shifts ``loaded.model``'s heads by ``alpha * sigma *
        direction`` at every position for the block (``alpha``: the profile's own unless given;
        a per-trait profile's traits summed) and leaves the model unchanged on exit. The model
        must be the profile's (:meth:`check_fits`, by name and head shape)."""
        layout = head_layout(loaded.model)
        self.check_fits(layout, loaded.name)
        return HeadShift(layout, self.total_shift(alpha))

    def shifts(self, alphas: Sequence[float]) -> torch.Tensor:
        """(variants, layers, heads * head_dim) shifts. Pooled profile: one variant per alpha;
        per-trait profile: variant ``a * 5 + t`` shifts only trait ``t``'s heads by ``alphas[a]``."""
        n_layers, n_heads, dim = self.shape
        groups = len(TRAITS) if self.per_trait else 1
        out = torch.zeros(len(alphas) * groups, n_layers, n_heads * dim)
        for m in range(len(self.layer)):
            g = int(self.trait[m]) if self.per_trait else 0
            cols = slice(int(self.head[m]) * dim, (int(self.head[m]) + 1) * dim)
            for a, alpha in enumerate(alphas):
                out[a * groups + g, int(self.layer[m]), cols] += (
                    alpha * self.sigma[m] * self.direction[m]
                )
        return out

    def total_shift(self, alpha: float | None = None) -> torch.Tensor:
        """(1, layers, heads * head_dim): every component shifted by ``alpha`` (default: the
        profile's), traits summed: what applies to open-ended text."""
        alpha = self.alpha if alpha is None else alpha
        if alpha is None:
            raise PASError("the profile has no alpha; pass one")
        s = self.shifts([alpha])
        return s.sum(0, keepdim=True)

    def save(self, stem: Path) -> None:
        stem.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            k: getattr(self, k).contiguous()
            for k in ("layer", "head", "trait", "direction", "sigma", "train_acc", "val_acc")
        }
        save_file(tensors, str(stem.with_suffix(".safetensors")))
        import transformers

        from palign import __version__

        sidecar = {
            "model": self.model,
            "shape": list(self.shape),
            "alpha": self.alpha,
            "heads": [[int(layer), int(head)] for layer, head in zip(self.layer, self.head)],
            "traits": [TRAITS[int(t)] if t >= 0 else "all" for t in self.trait],
            **self.meta,
            "versions": {"palign": __version__, "transformers": transformers.__version__},
        }
        stem.with_suffix(".json").write_text(json.dumps(sidecar, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> PASProfile:
        """Load from ``<stem>.safetensors`` / ``<stem>.json`` (either path, or the stem)."""
        stem = Path(path)
        stem = stem.with_suffix("") if stem.suffix in (".json", ".safetensors") else stem
        files = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise PASError(f"profile={path}: missing {', '.join(missing)}")
        try:
            tensors = load_file(str(files[0]))
        except Exception as e:  # safetensors' own error types: the file is named instead
            raise ArtifactError(
                f"{files[0]}: not a readable profile tensor file ({type(e).__name__})",
                "re-run the PAS run that wrote it",
            ) from None
        try:
            sidecar = json.loads(files[1].read_text(encoding="utf-8"))
            meta = {
                k: v
                for k, v in sidecar.items()
                if k not in ("model", "shape", "alpha", "heads", "traits")
            }
            return cls(
                model=str(sidecar["model"]),
                shape=tuple(int(n) for n in sidecar["shape"]),
                alpha=sidecar["alpha"],
                meta=meta,
                **tensors,
            )
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise ArtifactError(
                f"{files[1]}: not a palign profile ({type(e).__name__}: {e})",
                "re-run the PAS run that wrote it",
            ) from None
