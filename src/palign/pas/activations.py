"""Contrastive head activations: every head's output at the prefilled answer letter.

For each item, the prompt (neutral system prompt) is rendered with the assistant's answer
prefilled up to option letter "A", and again up to "E" (shaped as the scorer asks, or as the
reference code does: :func:`contrastive_prompts`). Each head's output (its slice of the
``o_proj`` input) at that last token is recorded. These do not depend on the subject, so they are
computed once per model and prompt setting and cached on disk.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Sequence

import torch
from safetensors.torch import load_file, save_file

from palign import cache_root
from palign.data.papi import Item
from palign.errors import PASError
from palign.eval.prompts import NEUTRAL_SYSTEM_PROMPT, reference_contrastive_question
from palign.eval.scoring import Scorer
from palign.pas.heads import HeadLayout

log = logging.getLogger(__name__)
POSITIVE, NEGATIVE = "A", "E"


class HeadRecorder:
    """Records each head's output at the last position of every row of ``suffix`` forwards,
    while entered (``scorer.applied(HeadRecorder(layout))``); kept on the model's device until
    :meth:`stacked`. A new attempt of the run (stage ``start``) discards what was recorded."""

    def __init__(self, layout: HeadLayout):
        self.layout = layout
        self.armed = False
        self.batches: list[list[torch.Tensor]] = []
        self._handles = []

    def listen(self, stage: str, variant: torch.Tensor) -> None:
        if stage == "start":
            self.batches.clear()
        self.armed = stage == "suffix"
        if self.armed:
            self.batches.append([])

    def _hook(self, module, args):
        if self.armed:
            self.batches[-1].append(args[0][:, -1].detach())

    def __enter__(self):
        self._handles = [p.register_forward_pre_hook(self._hook) for p in self.layout.o_projs]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()

    def stacked(self) -> torch.Tensor:
        """(rows in batch order, layers, heads, head_dim) float32 on the CPU."""
        per_batch = [
            torch.stack([layer.float().cpu() for layer in layers], 1) for layers in self.batches
        ]
        n, h, d = self.layout.shape
        return torch.cat(per_batch).reshape(-1, n, h, d)


def _model_fingerprint(model) -> str:
    """A cheap digest of some weights, so differently initialised models never share a cache."""
    digest = hashlib.sha1()
    for _, param in list(model.named_parameters())[:3]:
        digest.update(param.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:12]


SHAPES = ("scoring", "reference")


def contrastive_prompts(
    scorer: Scorer,
    items: Sequence[Item],
    system_prompt: str = NEUTRAL_SYSTEM_PROMPT,
    shape: str = "scoring",
) -> list[list[int]]:
    """Token ids: rows 2i / 2i+1 are item i answered "A" / "E" (prefilled). ``shape="scoring"``:
    the scorer's question, the answer after ``scoring.answer_prefix`` ("Option (A"): the heads
    are read where logit scoring reads the answer. ``"reference"``: as the reference code, the
    statement as printed (:func:`reference_contrastive_question`) and the bare letter as the
    assistant's answer. Checks that the two prompts differ exactly at their recorded (last)
    token."""
    if shape not in SHAPES:
        raise PASError(f"method.contrastive={shape!r} is not one of {SHAPES}")
    if shape == "scoring":
        prefix = scorer.config.answer_prefix
        pos = scorer.encode_prompts(system_prompt, items, prefix + POSITIVE)
        neg = scorer.encode_prompts(system_prompt, items, prefix + NEGATIVE)
    else:
        render, encode = scorer.renderer.render, scorer.renderer.encode
        questions = [reference_contrastive_question(it) for it in items]
        pos = [encode(render(system_prompt, q, POSITIVE)) for q in questions]
        neg = [encode(render(system_prompt, q, NEGATIVE)) for q in questions]
    rows = []
    for item, a, e in zip(items, pos, neg, strict=True):
        if a[-1] == e[-1] or a[:-1] != e[:-1]:
            raise PASError(
                f"item {item.number}: the 'A' and 'E' prompts do not differ (only) at the recorded "
                f"last token (tokens ...{a[-3:]} vs ...{e[-3:]}); check scoring.answer_prefix and "
                "the chat template"
            )
        rows += [a, e]
    return rows


def contrastive_activations(
    scorer: Scorer,
    layout: HeadLayout,
    items: Sequence[Item],
    system_prompt: str = NEUTRAL_SYSTEM_PROMPT,
    cache_dir: str | None = None,
    shape: str = "scoring",
) -> torch.Tensor:
    """(items, 2, layers, heads, head_dim) float32 head outputs for the "A" and "E" answers
    (prompts of :func:`contrastive_prompts` ``shape``).

    Cached under ``<cache_root>/activations/`` by model name, weights digest and prompt tokens.
    """
    prompts = contrastive_prompts(scorer, items, system_prompt, shape)
    key = hashlib.sha1()
    key.update(f"{scorer.loaded.name}:{_model_fingerprint(scorer.loaded.model)}".encode())
    for p in prompts:
        key.update(str(p).encode())
    path = (
        cache_root(cache_dir)
        / "activations"
        / f"{scorer.loaded.name}-{key.hexdigest()[:16]}.safetensors"
    )
    if path.is_file():
        try:
            acts = load_file(str(path))["activations"]
            if acts.shape == (len(items), 2, *layout.shape):
                return acts
            reason = f"shape {tuple(acts.shape)}"
        except Exception as e:  # a torn or foreign file: safetensors' own error types
            reason = type(e).__name__
        log.warning("Activation cache %s is corrupt (%s): computing it again", path, reason)
    start = time.perf_counter()
    with scorer.applied(HeadRecorder(layout)) as recorder:
        outputs = scorer.run(
            prompts, decode=False, desc=f"head activations, {len(prompts)} prompts"
        )
    order = torch.cat([o["index"] for o in outputs]).argsort()
    acts = recorder.stacked()[order].reshape(len(items), 2, *layout.shape).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({"activations": acts}, str(tmp))
    tmp.replace(path)
    log.info(
        "Head activations for %d items in %.1f s (cached in %s)",
        len(items),
        time.perf_counter() - start,
        path,
    )
    return acts
