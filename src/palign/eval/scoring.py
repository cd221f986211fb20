"""Answering inventory items with an LLM, in a Lightning predict loop.

All item prompts of one call share a long token prefix (chat template, system prompt such as the
~1.5k-token few-shot context, the start of the question). That prefix is run through the model
once; its KV cache is reused for every batch. The remaining tokens of each prompt (the suffix) are
left-padded *after* the prefix, with explicit position ids, so all rows end in the same column:
one forward gives every row's next-token logits, and greedy decoding appends columns in lockstep.
The keys, values and attention mask of a batch are preallocated for its whole decode
(:mod:`palign.models.kv_cache`, reused by the next batch while it fits): each row's prefix is
written into them once, each decoded token in place; nothing grows by concatenation per step.

Two ways to answer (``mode``):

- ``logit`` (default): the assistant turn is prefilled up to the option letter
  (``answer_prefix``, e.g. ``"Option ("``); the log-probabilities of the five letter tokens at the
  next position give the answer distribution; the answer is its argmax (A=5 ... E=1).
- ``generate`` (paper-compatible): greedy decoding of up to ``max_new_tokens`` tokens after the
  assistant turn prefilled with ``generate_prefix`` ("Option", as the reference code); the text
  (the prefill, then the continuation up to and including the end-of-turn token, special tokens
  kept as the reference decodes them) is parsed for the first option letter in its first
  ``parse_window`` characters, by the reference's rule (``parse=reference``) or by palign's
  (``parse=word``, see :func:`parse_answer`). Unparseable answers are kept as 0 and counted.
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field, replace

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from palign.constants import LETTER_SCORE, OPTION_LETTERS, UNPARSED
from palign.data.papi import Item
from palign.errors import ModelError
from palign.eval.answers import Answers
from palign.eval.prompts import PromptRenderer, asked_question
from palign.models.batching import left_pad, position_ids
from palign.models.loading import LoadedModel
from palign.models.placement import make_trainer
from palign.progress import BatchBar

log = logging.getLogger(__name__)

MODES = ("logit", "generate")
PARSE_RULES = ("reference", "word")
#: The reference code's parser: an option letter followed by a non-letter.
_REFERENCE = re.compile(r"[abcdeABCDE][^a-zA-Z]")
#: palign's: an option letter standing alone (no letter on either side).
_WORD = re.compile(r"(?<![a-zA-Z])[abcdeABCDE](?![a-zA-Z])")


@dataclass
class ScoringConfig:
    """How LLM answers are read (``scoring`` in ``conf/config.yaml``, where ``mode``, ``parse``
    and ``strip_period`` come from the protocol and ``batch_size`` from the hardware)."""

    mode: str = field(
        default="logit",
        metadata={"help": "logit (option probabilities) or generate (parse generated text)"},
    )
    answer_prefix: str = field(
        default="Option (", metadata={"help": "logit mode: the assistant turn up to the letter"}
    )
    generate_prefix: str = field(
        default="Option", metadata={"help": "generate mode: the prefill before decoding"}
    )
    batch_size: int = field(
        default=16, metadata={"help": "rows per forward (halved on out-of-memory)"}
    )
    max_new_tokens: int = field(
        default=15, metadata={"help": "generate mode: tokens decoded per answer"}
    )
    parse_window: int = field(
        default=12, metadata={"help": "generate mode: characters read for the letter"}
    )
    parse: str = field(
        default="word",
        metadata={"help": "generate mode: word (a letter standing alone) or reference"},
    )
    strip_period: bool = field(
        default=True, metadata={"help": "statements without their final period"}
    )
    use_chat_template: bool = field(
        default=True, metadata={"help": "prompts through the tokenizer's chat template"}
    )


class ScoringError(ModelError):
    """The model/tokenizer cannot be scored as configured; the message names the config key."""


def check_scoring(config: ScoringConfig) -> ScoringConfig:
    """``config`` when every value is one the scorer takes (checked for every run, whether or
    not a method scores); else a :class:`ScoringError` naming the key, the value and what is
    allowed."""
    if config.mode not in MODES:
        raise ScoringError(f"scoring.mode={config.mode!r} is not one of {MODES}")
    if config.parse not in PARSE_RULES:
        raise ScoringError(f"scoring.parse={config.parse!r} is not one of {PARSE_RULES}")
    for key in ("batch_size", "max_new_tokens", "parse_window"):
        if getattr(config, key) < 1:
            raise ScoringError(f"scoring.{key}={getattr(config, key)} must be >= 1")
    return config


def parse_answer(text: str, window: int = 12, rule: str = "word") -> int:
    """Raw answer (5..1) of the first option letter in ``text[:window]``, or 0 if there is none.

    ``rule="reference"``: as the paper's reference code, a letter followed by a non-letter
    within the window, even inside a word ("I would choose (B)" reads as D: the "d" of
    "would"). ``rule="word"`` (palign's fix): a letter with no letter on either side; one that
    ends the window counts only when the text ends there too (what followed it was not cut off).
    """
    match = answer_match(text, window, rule)
    return LETTER_SCORE[match.group()[0].upper()] if match else UNPARSED


def answer_match(text: str, window: int = 12, rule: str = "word") -> re.Match | None:
    """The match of the option letter :func:`parse_answer` reads in ``text`` (its letter is
    ``group()[0]``, at ``start()``), or None."""
    if rule == "reference":
        return _REFERENCE.search(text[:window])
    if rule != "word":
        raise ScoringError(f"scoring.parse={rule!r} is not one of {PARSE_RULES}")
    head = text[:window]
    for match in _WORD.finditer(head):
        if match.end() == len(head) and len(text) > window:
            continue  # the letter ends the window; what follows it was cut off
        return match
    return None


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by all sequences, leaving each >= 1 token."""
    if not sequences:
        return 0
    shortest = min(len(s) for s in sequences)
    first = np.asarray(sequences[0][:shortest])
    limit = shortest - 1
    for seq in sequences[1:]:
        diff = np.nonzero(np.asarray(seq[:shortest]) != first)[0]
        if diff.size:
            limit = min(limit, int(diff[0]))
    return max(limit, 0)


def letter_token_ids(renderer: PromptRenderer, answer_prefix: str) -> list[int]:
    """Token id of each option letter right after ``answer_prefix`` in an assistant turn.

    Raises :class:`ScoringError` if a letter is not one token appended to the prefix's tokens.
    """
    base = renderer.render("s", "q", answer_prefix)
    base_ids = renderer.encode(base)
    ids = []
    for letter in OPTION_LETTERS:
        full = renderer.encode(base + letter)
        if len(full) != len(base_ids) + 1 or full[: len(base_ids)] != base_ids:
            raise ScoringError(
                f"scoring.answer_prefix={answer_prefix!r}: the tokenizer does not add option "
                f"letter {letter!r} as a single token after it; choose another prefix or "
                "use scoring.mode=generate"
            )
        ids.append(full[-1])
    if len(set(ids)) != len(ids):
        raise ScoringError(f"scoring.answer_prefix={answer_prefix!r}: option letters share a token")
    return ids


class SuffixBatches(L.LightningDataModule):
    """Predict batches of prompt suffixes (the tokens after the shared prefix).

    Rows are grouped by length to limit padding; each batch is a dict with ``input_ids`` (B, S)
    left-padded, ``attention_mask`` (B, S), ``index`` (B,) into the original order and
    ``variant`` (B,): which prefix variant each row continues (all 0 unless given).
    """

    def __init__(
        self,
        suffixes: Sequence[Sequence[int]],
        pad_id: int,
        batch_size: int,
        variants: Sequence[int] | None = None,
    ):
        super().__init__()
        self.suffixes = [list(s) for s in suffixes]
        self.variants = list(variants) if variants is not None else [0] * len(self.suffixes)
        self.pad_id = pad_id
        self.batch_size = batch_size

    def predict_dataloader(self) -> DataLoader:
        order = sorted(range(len(self.suffixes)), key=lambda i: len(self.suffixes[i]))
        return DataLoader(
            order, batch_size=self.batch_size, shuffle=False, collate_fn=self._collate
        )

    def _collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        ids, mask = left_pad([self.suffixes[i] for i in indices], self.pad_id)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "index": torch.tensor(indices),
            "variant": torch.tensor([self.variants[i] for i in indices]),
        }


#: Called before every model forward of the scorer with the stage ("prefix", "suffix" or
#: "decode") and the (B,) variant id of each row: how interventions vary per row (e.g. alpha)
#: and how activation recorders know which rows they see. Stage "start" (no rows) begins each
#: attempt of a run: a run retried with smaller batches after running out of memory starts over.
ForwardListener = Callable[[str, torch.Tensor], None]


@functools.cache
def cache_keyword(model_class: type) -> str:
    """The keyword under which ``model_class.forward`` takes a KV cache: ``cache`` where
    transformers renamed it (5.x; ``past_key_values`` is deprecated there, to be removed in
    5.40), else ``past_key_values``."""
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


class ItemScorer(L.LightningModule):
    """Runs a causal LM over suffix batches that continue one shared, cached prefix.

    ``predict_step`` returns ``index`` (B,), ``letter_logprobs`` (B, 5) (log-softmax over the whole
    vocabulary, read at the first answer position) and, in ``generate`` mode, ``tokens``
    (B, max_new_tokens) of greedy continuations padded with ``pad_id`` after EOS.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        letter_ids: Sequence[int] | None,
        pad_id: int,
        eos_ids: Sequence[int],
        mode: str = "logit",
        max_new_tokens: int = 15,
    ):
        super().__init__()
        if mode not in MODES:
            raise ScoringError(f"scoring.mode={mode!r} is not one of {MODES}")
        self.model = model
        self.letter_ids = list(letter_ids) if letter_ids is not None else None
        self.pad_id = pad_id
        self.eos_ids = list(eos_ids)
        self.mode = mode
        self.max_new_tokens = max_new_tokens
        self._prefix_ids: list[int] = []
        self._variants = 1
        self._prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        #: Keys, values and mask preallocated for a batch's whole decode (see ``_batch_cache``).
        self._slab = None
        self.listeners: list[ForwardListener] = []
        #: Whether ``generate`` mode decodes (off for runs that only record activations).
        self.decode = True
        #: Called with the number of tokens produced by each greedy decoding step.
        self.on_generated: Callable[[int], None] = lambda tokens: None

    def set_prefix(self, prefix_ids: Sequence[int], variants: int = 1) -> None:
        """Use ``prefix_ids`` (>= 1 token) as the shared prefix, in ``variants`` versions.

        Each variant's KV cache is built on first use, in one forward with one row per variant
        (listeners see variant ids 0..variants-1), and reused until the prefix changes.
        """
        if len(prefix_ids) == 0:
            raise ScoringError("the prompts share no token prefix; the scorer needs at least one")
        if list(prefix_ids) != self._prefix_ids or variants != self._variants:
            self._prefix_ids = list(prefix_ids)
            self._variants = variants
            self._prefix_kv = None
            self._slab = None

    def clear_prefix_cache(self) -> None:
        """Forget the cached prefix KV (call after changing the model, e.g. adding hooks)."""
        self._prefix_kv = None
        self._slab = None

    @property
    def prefix_length(self) -> int:
        return len(self._prefix_ids)

    def _notify(self, stage: str, variant: torch.Tensor) -> None:
        for listener in self.listeners:
            listener(stage, variant)

    def _prefix_cache(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's prefix keys and values, (variants, kv heads, prefix length, head dim),
        computed on first use in one forward with one row per variant."""
        if self._prefix_kv is None:
            self._slab = None
            ids = torch.tensor([self._prefix_ids], device=self.device).expand(self._variants, -1)
            self._notify("prefix", torch.arange(self._variants, device=self.device))
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)  # no logits needed
            cache = getattr(out, "cache", None)
            cache = out.past_key_values if cache is None else cache  # its name before 5.x
            self._prefix_kv = [(layer.keys, layer.values) for layer in cache.layers]
        return self._prefix_kv

    def _batch_cache(self, variant: torch.Tensor, width: int, mask_dtype: torch.dtype):
        """The cache and the attention-mask buffer for a batch of ``len(variant)`` rows of
        ``width`` suffix tokens continuing the prefix, with room for every token the batch
        decodes: a :class:`~palign.models.kv_cache.PrefixSlab` kept from batch to batch while
        it is large enough (the prefix is then not copied again)."""
        from palign.models.kv_cache import PrefixSlab

        prefix = self._prefix_cache()
        rows = variant.shape[0]
        steps = self.max_new_tokens - 1 if self.mode == "generate" and self.decode else 0
        length = self.prefix_length + width + steps
        if self._slab is None or not self._slab.fits(rows, length, mask_dtype):
            self._slab = None  # freed before the next one is allocated
            self._slab = PrefixSlab(
                prefix,
                self.prefix_length,
                self.model.config,
                rows,
                length,
                mask_dtype,
                variant.device,
            )
        return self._slab.cache(variant), self._slab.mask[:rows]

    def on_predict_end(self) -> None:
        """The slab is not kept between runs (the device memory goes back)."""
        self._slab = None

    def forward(self, input_ids, attention_mask, past_key_values, position_ids):
        return (
            self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=True,
                logits_to_keep=1,
                **{cache_keyword(type(self.model)): past_key_values},
            )
            .logits[:, -1]
            .float()
        )

    def predict_step(
        self, batch: dict[str, torch.Tensor], batch_idx: int = 0
    ) -> dict[str, torch.Tensor]:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        variant = batch.get("variant")
        if variant is None:
            variant = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
        prefix, width = self.prefix_length, ids.shape[1]
        cache, mask_buffer = self._batch_cache(variant, width, mask.dtype)
        mask_buffer[:, prefix : prefix + width] = mask
        positions = position_ids(mask, start=prefix)
        self._notify("suffix", variant)
        logits = self(ids, mask_buffer[:, : prefix + width], cache, positions)
        out = {"index": batch["index"]}
        if self.letter_ids is not None:
            out["letter_logprobs"] = torch.log_softmax(logits, -1)[:, self.letter_ids]
        if self.mode == "generate" and self.decode:
            out["tokens"] = self._greedy(
                logits, mask_buffer, prefix + width, positions[:, -1], cache, variant
            )
        return out

    def _greedy(self, logits, mask_buffer, length, last_position, cache, variant) -> torch.Tensor:
        """Greedy decoding in lockstep; ``mask_buffer`` (rows, capacity) holds the attention mask
        of the first ``length`` positions and gets one more column per step, in place, as the
        cache gets each step's keys and values."""
        rows = logits.shape[0]
        eos = torch.tensor(self.eos_ids, device=logits.device)
        tokens = torch.full(
            (rows, self.max_new_tokens), self.pad_id, dtype=torch.long, device=logits.device
        )
        done = torch.zeros(rows, dtype=torch.bool, device=logits.device)
        for step in range(self.max_new_tokens):
            nxt = logits.argmax(-1)
            tokens[:, step] = torch.where(done, self.pad_id, nxt)
            self.on_generated(int((~done).sum()))
            done |= torch.isin(nxt, eos)
            if done.all() or step == self.max_new_tokens - 1:
                break
            mask_buffer[:, length] = 1
            length += 1
            last_position = last_position + 1
            self._notify("decode", variant)
            logits = self(nxt[:, None], mask_buffer[:, :length], cache, last_position[:, None])
        return tokens


class Scorer:
    """Answers items with a loaded model: renders prompts, shares the prefix, runs the predict loop.

    Methods change what the model computes only through :meth:`applied` (hooks, new adapter
    weights), which keeps the cached prefix consistent with the model. ``precision``: the
    Lightning precision of the predict loop (the weights stay as loaded). ``batch_size`` adapts:
    a device out of memory halves it for the rest of the run.
    """

    def __init__(
        self, loaded: LoadedModel, config: ScoringConfig | None = None, precision: str = "32-true"
    ):
        self.loaded = loaded
        self.config = check_scoring(config or ScoringConfig())
        self.batch_size = self.config.batch_size
        self.bar = BatchBar()
        self.trainer = make_trainer(loaded.device, precision, callbacks=[self.bar])
        self.renderer = PromptRenderer(loaded.tokenizer, self.config.use_chat_template)
        tok = loaded.tokenizer
        generate = self.config.mode == "generate"
        eos = eos_ids(loaded) if generate else []
        self._module = ItemScorer(
            loaded.model,
            letter_ids=None
            if generate
            else letter_token_ids(self.renderer, self.config.answer_prefix),
            pad_id=tok.pad_token_id,
            eos_ids=eos,
            mode=self.config.mode,
            max_new_tokens=self.config.max_new_tokens,
        )
        self._module.on_generated = loaded.meter.generated
        #: Open-ended replies (:meth:`replies`): the question template, None for the inventory's.
        self._reply_prompt: str | None = None

    @property
    def assistant_prefix(self) -> str:
        """What the assistant turn is prefilled with (the mode's prefix)."""
        return (
            self.config.generate_prefix
            if self.config.mode == "generate"
            else self.config.answer_prefix
        )

    def question(self, item: Item) -> str:
        """The inventory question about ``item`` as this scorer asks it (inside
        :meth:`replies`: the open-ended question)."""
        return asked_question(item, self._reply_prompt, self.config.strip_period)

    @contextmanager
    def replies(self, prompt: str, max_new_tokens: int):
        """For the block, :meth:`score` asks ``prompt`` (``{statement}``: the item's statement)
        about each item and returns the free replies (``Answers.texts``: greedy, up to
        ``max_new_tokens`` tokens after an empty assistant turn, special tokens left out; their
        ``scores`` mean nothing). Methods answer as they do for the inventory (their system
        prompt, their :meth:`applied` changes): ``evaluation=open_ended``."""
        module = self._module
        saved = (self.config, module.mode, module.max_new_tokens, module.eos_ids)
        self.config = replace(
            self.config, mode="generate", generate_prefix="", max_new_tokens=max_new_tokens
        )
        module.mode, module.max_new_tokens = "generate", max_new_tokens
        module.eos_ids = eos_ids(self.loaded)
        self._reply_prompt = prompt
        try:
            yield self
        finally:
            self.config, module.mode, module.max_new_tokens, module.eos_ids = saved
            self._reply_prompt = None

    def generate(self, requests: Sequence[tuple[str, str]], desc: str | None = None) -> list[str]:
        """Greedy replies to ``requests`` (system prompt, user message), up to
        ``config.max_new_tokens`` tokens after an empty assistant turn (a scorer made with
        ``mode=generate``), special tokens left out: how ``palign judge`` runs a local judge."""
        if self.config.mode != "generate":
            raise ScoringError("Scorer.generate needs a scorer made with scoring.mode=generate")
        prompts = [self.renderer.encode(self.renderer.render(s, u, "")) for s, u in requests]
        outputs = self.run(prompts, desc=desc)
        order = np.argsort(torch.cat([o["index"] for o in outputs]).cpu().numpy())
        tokens = torch.cat([o["tokens"] for o in outputs]).cpu()[order]
        return self.decode(tokens, skip_special_tokens=True)

    @contextmanager
    def applied(self, *changes: AbstractContextManager):
        """The model as ``changes`` make it, for the block: each is a context manager that
        changes what the model computes on entry and restores it on exit (head shifts, an
        adapter's weights, a recorder's hooks). One with a ``listen(stage, variant)`` method is
        told, before every forward, which variant each row is (e.g. its alpha). The cached
        prefix is dropped on entry and exit: keys and values computed by the model as it was
        would be wrong. Yields the entered changes (one, or a tuple)."""
        with ExitStack() as stack:
            entered = [stack.enter_context(change) for change in changes]
            for change in changes:
                if hasattr(change, "listen"):
                    self._module.listeners.append(change.listen)
                    stack.callback(self._module.listeners.remove, change.listen)
            self._module.clear_prefix_cache()
            stack.callback(self._module.clear_prefix_cache)
            yield entered[0] if len(entered) == 1 else tuple(entered)

    def encode_prompts(
        self, system_prompt: str, items: Sequence[Item], assistant_prefix: str | None = None
    ) -> list[list[int]]:
        """Token ids of each item's prompt (``assistant_prefix`` defaults to the mode's)."""
        prefix = self.assistant_prefix if assistant_prefix is None else assistant_prefix
        return [
            self.renderer.encode(self.renderer.render(system_prompt, self.question(it), prefix))
            for it in items
        ]

    def run(
        self,
        prompts: Sequence[Sequence[int]],
        variants: Sequence[int] | None = None,
        n_variants: int = 1,
        decode: bool = True,
        desc: str | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """Run token-id prompts through the predict loop; prompt ``i`` continues prefix variant
        ``variants[i]`` of ``n_variants``. Returns the predict-step outputs, batch by batch
        (``decode=False``: one forward per batch, no generated tokens, in either mode). ``desc``
        labels the progress bar (default: the mode and the number of prompts).

        Out of device memory, the batch size is halved (one log line) and the run starts over,
        down to batches of one row."""
        self.bar.desc = (
            desc or f"{self.config.mode if decode else 'forward'} {len(prompts)} prompts"
        )
        shared = common_prefix_length(prompts)
        self._module.set_prefix(prompts[0][:shared], n_variants)
        suffixes = [p[shared:] for p in prompts]
        while True:
            data = SuffixBatches(
                suffixes, self.loaded.tokenizer.pad_token_id, self.batch_size, variants
            )
            self._module._notify("start", torch.zeros(0, dtype=torch.long))
            self._module.decode = decode
            try:
                return self.trainer.predict(self._module, datamodule=data, return_predictions=True)
            except torch.OutOfMemoryError:
                self._module.clear_prefix_cache()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if self.batch_size == 1:
                    raise
                self.batch_size //= 2
                log.warning(
                    "Out of device memory: scoring batch size halved to %d for the rest of the run",
                    self.batch_size,
                )

    def score(
        self,
        system_prompt: str,
        items: Sequence[Item],
        variants: Sequence[int] | None = None,
        n_variants: int = 1,
    ) -> Answers:
        """Answer ``items`` under ``system_prompt`` (item ``i`` under prefix variant
        ``variants[i]``); one shared prefix KV cache per variant for all of them."""
        outputs = self.run(self.encode_prompts(system_prompt, items), variants, n_variants)
        order = np.argsort(torch.cat([o["index"] for o in outputs]).cpu().numpy())
        if self.config.mode == "logit":
            logp = torch.cat([o["letter_logprobs"] for o in outputs]).cpu().double().numpy()[order]
            probs = np.exp(logp - logp.max(1, keepdims=True))
            probs /= probs.sum(1, keepdims=True)
            scores = 5 - logp.argmax(1)
            return Answers(scores=scores.astype(np.int64), probs=probs)
        tokens = torch.cat([o["tokens"] for o in outputs]).cpu()[order]
        if self._reply_prompt is not None:  # open-ended replies: the text only
            return Answers(
                scores=np.zeros(len(items), dtype=np.int64),
                texts=[t.strip() for t in self.decode(tokens, skip_special_tokens=True)],
            )
        texts = [self.assistant_prefix + t for t in self.decode(tokens)]
        scores = np.array(
            [parse_answer(t, self.config.parse_window, self.config.parse) for t in texts],
            dtype=np.int64,
        )
        return Answers(scores=scores, texts=texts)

    def decode(self, tokens: torch.Tensor, skip_special_tokens: bool = False) -> list[str]:
        """Each row of generated ``tokens`` (rows, steps) as text up to and including its first
        end-of-turn token, special tokens kept (as the reference code decodes) unless
        ``skip_special_tokens``."""
        eos = torch.tensor(self._module.eos_ids)
        ends = torch.isin(tokens, eos)
        rows = []
        for row, end in zip(tokens.tolist(), ends):
            stop = int(end.nonzero()[0, 0]) + 1 if end.any() else len(row)
            rows.append(row[:stop])
        return self.loaded.tokenizer.batch_decode(rows, skip_special_tokens=skip_special_tokens)


def eos_ids(loaded: LoadedModel) -> list[int]:
    """Token ids that end a generation: the tokenizer's EOS and the generation config's."""
    configured = getattr(loaded.model.generation_config, "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    return sorted({i for i in [loaded.tokenizer.eos_token_id, *ids] if i is not None})
