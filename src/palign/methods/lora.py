"""Methods that train a LoRA adapter per subject (DPO, PPO): shared adapter handling.

The model is wrapped once with a LoRA adapter (peft); every subject starts from a freshly
initialised adapter (B = 0, so the model equals the base model), trains it, and is evaluated
with it active through the run's scorer. The reference policy is the same weights with the
adapter disabled: one copy of the model in memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

from palign.constants import ANSWER_LABELS, OPTION_LETTERS
from palign.data.papi import Item, Subject
from palign.errors import ArtifactError, ConfigError
from palign.eval.prompts import NEUTRAL_SYSTEM_PROMPT
from palign.methods.base import Answers, Artifact, Method, MethodContext, MethodSettings, setting
from palign.methods.checks import check_names, check_seed, integer, number
from palign.models.placement import check_precision, make_trainer
from palign.progress import StepBar


def answer_completion(answer: int, answer_prefix: str) -> str:
    """The assistant's answer text for a raw answer 1..5, e.g. 'Option (B). Moderately Accurate'."""
    return f"{answer_prefix}{OPTION_LETTERS[5 - answer]}). {ANSWER_LABELS[answer]}"


#: PEFT's file names: ``PeftModel.from_pretrained(base_model, folder)`` loads the adapter.
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@dataclass
class AdapterArtifact(Artifact):
    """One subject's trained LoRA weights in PEFT's format (``adapter_config.json`` and
    ``adapter_model.safetensors``: ``PeftModel.from_pretrained(base, folder)`` loads them),
    beside ``adapter.json`` (palign's model name and LoRA settings, checked before applying it)
    and ``train_history.json`` (per-step loss, rewards, KL, margins)."""

    state: dict[str, torch.Tensor] | None = None
    model: str = ""
    lora: dict | None = None
    #: The base model's hub id or folder, recorded as PEFT's ``base_model_name_or_path``.
    base: str | None = None
    #: The folder it was loaded from (:meth:`load`), named in errors.
    source: Path | None = None

    def save(self, directory: Path) -> None:
        import json

        from peft import LoraConfig
        from safetensors.torch import save_file

        super().save(directory)
        config = LoraConfig(task_type="CAUSAL_LM", base_model_name_or_path=self.base, **self.lora)
        config.save_pretrained(str(directory))
        save_file(
            {k: v.contiguous() for k, v in self.state.items()},
            str(directory / PEFT_WEIGHTS),
            metadata={"format": "pt"},
        )
        (directory / "adapter.json").write_text(
            json.dumps({"model": self.model, "lora": self.lora}, indent=2)
        )
        (directory / "train_history.json").write_text(json.dumps(self.history or [], indent=1))

    @classmethod
    def load(cls, directory: str | Path) -> AdapterArtifact:
        """The adapter :meth:`save` wrote into ``directory`` (an ``artifacts/<method>/<case>/``
        folder of dpo or ppo); a missing or unreadable file is an ArtifactError naming it."""
        import json

        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / "adapter.json").is_file():
            raise ArtifactError(
                f"adapter={directory}: no adapter.json (expected an artifacts/<method>/<case>/ "
                "folder of dpo or ppo)"
            )
        try:
            info = json.loads((directory / "adapter.json").read_text(encoding="utf-8"))
            model, lora = str(info["model"]), dict(info["lora"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise ArtifactError(
                f"{directory / 'adapter.json'}: not a palign adapter description ({e})"
            ) from None
        try:
            state = load_file(str(directory / PEFT_WEIGHTS))
        except Exception as e:  # safetensors' own error types: the file is named instead
            raise ArtifactError(
                f"{directory / PEFT_WEIGHTS}: not a readable adapter ({type(e).__name__})"
            ) from None
        meta = {}
        if (directory / "artifact.json").is_file():
            meta = json.loads((directory / "artifact.json").read_text(encoding="utf-8"))
        case = meta.pop("case", -1)
        return cls(case=case, meta=meta, state=state, model=model, lora=lora, source=directory)

    @contextmanager
    def applied(self, loaded, alpha: float | None = None) -> Iterator[None]:
        """``loaded.model`` with this adapter active for the block (its LoRA layers added, then
        removed on exit: the plain base model again). The adapter must have been trained on
        this model (by name)."""
        from peft import LoraConfig, get_peft_model

        if alpha is not None:
            raise ConfigError("applied: alpha applies to PAS profiles, not to an adapter")
        if self.model != loaded.name:
            raise ArtifactError(
                f"{self.source or 'adapter'}: adapter was trained on model {self.model!r}, not "
                f"{loaded.name!r} (pass model={self.model})"
            )
        peft_model = get_peft_model(loaded.model, LoraConfig(task_type="CAUSAL_LM", **self.lora))
        try:
            with self.active_in(peft_model):
                yield
        finally:
            peft_model.unload()

    @contextmanager
    def active_in(self, peft_model) -> Iterator[None]:
        """This adapter's weights in the LoRA layers of ``peft_model`` (made with the same LoRA
        settings) for the block, in eval mode; the weights it held before are restored on exit.
        :meth:`applied` and the training methods' answering both go through it."""
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        before = {k: v.clone() for k, v in get_peft_model_state_dict(peft_model).items()}
        set_peft_model_state_dict(peft_model, self.state)
        peft_model.eval()
        try:
            yield
        finally:
            set_peft_model_state_dict(peft_model, before)


def _precision(key: str, value: object, error: type) -> str:
    """A Lightning precision that keeps the loaded weights (worded as ``hardware.precision``,
    where a run's value comes from: :func:`palign.models.placement.check_precision`)."""
    return check_precision(value)


@dataclass
class LoraSettings(MethodSettings):
    """What every adapter-training method has (DPO, PPO): the optimiser's learning rate, batch
    and steps, and the LoRA adapter's shape."""

    lr: float = setting(5e-4, "learning rate (AdamW)", number(above=0))
    batch_size: int = setting(16, "examples per optimiser step", integer(1))
    steps: int = setting(250, "optimiser steps per subject", integer(1))
    lora_r: int = setting(16, "LoRA rank", integer(1))
    lora_alpha: float = setting(100, "LoRA scaling alpha", number(above=0))
    lora_dropout: float = setting(0.05, "LoRA dropout", number(at_least=0, below=1))
    target_modules: list[str] = setting(
        ["q_proj", "k_proj", "v_proj", "o_proj"], "module names given LoRA adapters", check_names
    )
    seed: int = setting(
        0, "seed of the adapter's initialisation and data order", check_seed, follows="seed"
    )
    precision: str = setting(
        "32-true",
        "Lightning precision of training (the weights stay as loaded)",
        _precision,
        follows="hardware.precision",
    )


class LoraMethod(Method):
    """Base of adapter-training methods: wraps the model once, resets the adapter per subject.
    ``self.lora``: the adapter's PEFT settings (r, alpha, dropout, target modules)."""

    uses_llm = True
    replies = True  # answers with its adapter active in the scorer's model (scorer.applied)
    Settings = LoraSettings

    def __init__(self, **values: Any):
        super().__init__(**values)
        alpha = self.lora_alpha
        self.lora = dict(
            r=self.lora_r,
            lora_alpha=int(alpha) if alpha.is_integer() else alpha,  # 100, not 100.0
            lora_dropout=self.lora_dropout,
            target_modules=self.target_modules,
        )

    def setup(self, context: MethodContext) -> None:
        from peft import LoraConfig, get_peft_model

        super().setup(context)
        loaded = context.scorer.loaded
        self.device = loaded.device
        self.tokenizer = loaded.tokenizer
        self.renderer = context.scorer.renderer
        self.answer_prefix = context.scorer.config.answer_prefix
        self.peft_model = get_peft_model(
            loaded.model, LoraConfig(task_type="CAUSAL_LM", **self.lora)
        )
        self.peft_model.eval()

    def teardown(self) -> None:
        """Remove the LoRA layers: the shared model is the plain base model again."""
        self.peft_model.unload()

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        return [p for n, p in self.peft_model.named_parameters() if "lora_" in n]

    def reset_adapter(self, case: int) -> None:
        """Fresh LoRA weights for a subject (seeded by run seed and case; B = 0)."""
        from peft.tuners.lora import LoraLayer

        torch.manual_seed((self.seed * 1_000_003 + case) % (2**31))
        for module in self.peft_model.modules():
            if isinstance(module, LoraLayer):
                module.reset_lora_parameters("default", init_lora_weights=True)
        for p in self.lora_parameters():
            p.requires_grad_(True)

    def artifact(self, case: int, history: list[dict], meta: dict) -> AdapterArtifact:
        """The adapter weights and training record of ``case`` (a subject's, or the key of what
        was trained), copied out; the LoRA layers are then reset to B = 0, so outside
        :meth:`align` and :meth:`answer` the shared model is the base model."""
        from peft import get_peft_model_state_dict

        state = {
            k: v.detach().cpu().clone()
            for k, v in get_peft_model_state_dict(self.peft_model).items()
        }
        self.reset_adapter(case)
        return AdapterArtifact(
            case=case,
            state=state,
            model=self.context.scorer.loaded.name,
            lora=self.lora,
            base=getattr(self.context.scorer.loaded.model.config, "_name_or_path", None) or None,
            history=history,
            meta=meta,
        )

    @contextmanager
    def reference(self):
        """The reference policy: the base model (adapter disabled)."""
        with self.peft_model.disable_adapter():
            yield

    def trainer(self, steps: int, label: str, **settings) -> L.Trainer:
        """A Trainer for ``steps`` optimiser steps on the placed model, with a step bar."""
        return make_trainer(
            self.device,
            self.precision,
            max_steps=steps,
            callbacks=[StepBar(steps, label)],
            **settings,
        )

    def prompt_ids(self, item: Item, system: str = NEUTRAL_SYSTEM_PROMPT) -> list[int]:
        """The item prompt under ``system`` with the assistant turn opened (no prefill)."""
        return self.renderer.encode(
            self.renderer.render(system, self.context.scorer.question(item))
        )

    def answer(self, subject: Subject, artifact: AdapterArtifact, items: Sequence[Item]) -> Answers:
        scorer = self.context.scorer
        with scorer.applied(artifact.active_in(self.peft_model)):
            return scorer.score(NEUTRAL_SYSTEM_PROMPT, items)
