"""A KV cache for rows that continue one cached prefix, preallocated for a whole greedy decode.

:class:`PrefixSlab` holds, per attention layer, keys and values of shape (rows, kv heads,
capacity, head dim) on that layer's device (a model spread over GPUs keeps each layer's cache
on the layer's GPU), and a (rows, capacity) attention mask. Each row's prefix part is written
once (and again only when a later batch puts another prefix variant in that row); the suffix and
every decoded token are then written in place, after it. :meth:`PrefixSlab.cache` gives a
transformers ``DynamicCache`` whose full-attention layers are :class:`SlabLayer`: their
``update`` copies the new keys and values into the slab and returns views of the filled part,
the very tensors (shapes, values) that a growing ``DynamicLayer`` returns after concatenating, so
the attention computes the same numbers; nothing grows by concatenation, nothing is copied per
step but the new token's keys and values. Layers of another kind (sliding windows, KV sharing)
keep transformers' own class, filled with the prefix as before.

The slab is reused from batch to batch while it is large enough (capacity is rounded up to
``ROUND`` tokens so that slightly longer suffixes fit): the prefix is not copied again.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import CacheLayerMixin, DynamicCache, DynamicLayer

#: Capacity is rounded up to a multiple of this many tokens (later batches' suffixes fit).
ROUND = 64


class SlabLayer(CacheLayerMixin):
    """One attention layer's cache: the first ``rows`` rows of a preallocated slab, of which the
    first ``length`` positions are filled; ``keys``/``values`` are views of the filled part."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        super().__init__()
        self._keys, self._values = keys, values
        self.device = keys.device
        self.length = length
        self.is_initialized = True
        self._views()

    def _views(self) -> None:
        self.keys = self._keys[:, :, : self.length]
        self.values = self._values[:, :, : self.length]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise AssertionError("a slab layer is created initialised")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self._keys.shape[2]:
            raise RuntimeError(
                f"KV slab full: {end} positions asked for, {self._keys.shape[2]} allocated"
            )
        self._keys[:, :, self.length : end].copy_(key_states)
        self._values[:, :, self.length : end].copy_(value_states)
        self.length = end
        self._views()
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self._keys.shape[2]


class PrefixSlab:
    """Preallocated keys, values and attention mask for up to ``rows`` rows of ``capacity``
    positions, continuing the prefix of ``prefix_length`` tokens whose per-layer KV is ``prefix``
    (each (variants, kv heads, positions, head dim): all ``prefix_length`` positions for a full
    attention layer, fewer for a sliding window; or ``None`` for a layer that holds no cache).

    ``config``: the model's, to know which layers are plain full attention (those get slab
    layers; the others keep their transformers class). ``mask_dtype`` and ``mask_device``: of
    the batches' attention masks.
    """

    def __init__(
        self,
        prefix: Sequence[tuple[torch.Tensor | None, torch.Tensor | None]],
        prefix_length: int,
        config,
        rows: int,
        capacity: int,
        mask_dtype: torch.dtype,
        mask_device: torch.device | str,
    ):
        self.prefix = list(prefix)
        self.config = config
        self.prefix_length = prefix_length
        self.rows = rows
        self.capacity = -(-capacity // ROUND) * ROUND
        self.full = [type(layer) is DynamicLayer for layer in self._empty_cache().layers]
        self.keys: list[torch.Tensor | None] = []
        self.values: list[torch.Tensor | None] = []
        for (k, v), full in zip(self.prefix, self.full, strict=True):
            if not full or k is None:
                self.keys.append(None)
                self.values.append(None)
                continue
            if k.shape[2] != prefix_length:
                raise ValueError(f"a full attention layer holds {k.shape[2]} of {prefix_length}")
            shape = (rows, k.shape[1], self.capacity)
            self.keys.append(torch.empty(*shape, k.shape[3], dtype=k.dtype, device=k.device))
            self.values.append(torch.empty(*shape, v.shape[3], dtype=v.dtype, device=v.device))
        self.mask = torch.zeros(rows, self.capacity, dtype=mask_dtype, device=mask_device)
        self.mask[:, : self.prefix_length] = 1
        #: The prefix variant whose KV each row holds (-1: none written yet).
        self.row_variant = [-1] * rows

    def fits(self, rows: int, length: int, mask_dtype: torch.dtype) -> bool:
        """Whether ``rows`` rows of ``length`` positions fit (the mask of the same dtype)."""
        return rows <= self.rows and length <= self.capacity and mask_dtype == self.mask.dtype

    def _empty_cache(self) -> DynamicCache:
        cache = DynamicCache(config=self.config)
        if not cache.layers:  # a config that names no layer types: one full layer per prefix layer
            cache = DynamicCache(ddp_cache_data=[(None, None)] * len(self.prefix))
        return cache

    def cache(self, variant: torch.Tensor) -> DynamicCache:
        """A cache for a batch of ``len(variant)`` rows, row ``r`` continuing prefix variant
        ``variant[r]``: its prefix KV is written into the slab only where the row held another
        variant (or none); the batch's suffix and decoded tokens follow it."""
        rows = variant.shape[0]
        wanted = [int(v) for v in variant.tolist()]
        stale = [r for r in range(rows) if self.row_variant[r] != wanted[r]]
        for v in sorted({wanted[r] for r in stale}):
            where = [r for r in stale if wanted[r] == v]
            run = where == list(range(where[0], where[-1] + 1))  # consecutive rows: a slice
            for layer, (k, val) in enumerate(self.prefix):
                if self.keys[layer] is None:
                    continue
                rows_of = (
                    slice(where[0], where[-1] + 1) if run else torch.tensor(where, device=k.device)
                )
                self.keys[layer][rows_of, :, : self.prefix_length] = k[v]
                self.values[layer][rows_of, :, : self.prefix_length] = val[v]
            for r in where:
                self.row_variant[r] = v
        cache = self._empty_cache()
        for layer, (k, v) in enumerate(self.prefix):
            if self.keys[layer] is not None:
                cache.layers[layer] = SlabLayer(
                    self.keys[layer][:rows], self.values[layer][:rows], self.prefix_length
                )
            elif k is not None:  # transformers' own layer, given each row's prefix as before
                if k.shape[0] == 1:
                    rk, rv = k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)
                else:
                    rk = k.index_select(0, variant.to(k.device))
                    rv = v.index_select(0, variant.to(v.device))
                cache.layers[layer].update(rk, rv)
        return cache
