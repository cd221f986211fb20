"""Will a model fit? Its weights' bytes from its config alone, against the target device's memory.

:func:`estimate_memory` counts the parameters exactly by building the model on the meta device
(no weights read or allocated) and prices them as they will sit in memory after
:func:`palign.models.loading.finish_loading`:

* plain weights: ``model.dtype`` (2 bytes in bfloat16/float16, 4 in float32);
* bitsandbytes 4-bit (nf4/fp4): every ``nn.Linear`` weight except the output embeddings (the
  head, and layers tied to it or named in ``llm_int8_skip_modules``) takes 0.5 byte plus its
  absmax, one per block of 64 weights: float32 (4/64 byte a weight), or with double
  quantisation 8-bit (1/64) plus a float32 per 256 blocks; everything else (embeddings, head,
  norms, biases) is float32, as QLoRA's preparation leaves it;
* bitsandbytes 8-bit: 1 byte a linear weight plus a float32 scale per output row; the rest
  float32 likewise.

To the weights it adds a margin for what runs beside them: activations of a scoring or training
batch, the shared-prefix KV cache, the CUDA context, LoRA adapters and their optimiser state
(:data:`MARGIN_FRACTION` of the weights plus :data:`MARGIN_BYTES`). :func:`check_fits` compares
the total with the free memory of the target: ``cuda``/``cuda:N`` that GPU's free memory
(``torch.cuda.mem_get_info``), ``auto`` the sum over every visible GPU, ``cpu`` the available RAM
(``psutil.virtual_memory().available``; no check when psutil is not installed). It refuses with
one line naming the config keys to change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from palign.errors import ModelLoadError

#: Weights per absmax block of bitsandbytes' 4-bit quantisation (its default; transformers' config
#: has no setting for it).
BLOCKSIZE_4BIT = 64
#: Blocks per second-level (float32) absmax block of double quantisation.
BLOCKSIZE_NESTED = 256
#: Margin over the weights: this fraction of them ...
MARGIN_FRACTION = 0.10
#: ... plus this many bytes (CUDA context, a scoring batch's activations and prefix KV cache).
MARGIN_BYTES = 2 * 10**9

GB = 1e9


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a model needs loaded; ``n_quantized`` of its ``n_params`` are k-bit weights."""

    n_params: int
    n_quantized: int
    weight_bytes: int
    needed_bytes: int
    #: How the weights are stored, e.g. 'bfloat16' or 'nf4 4-bit'.
    format: str


def _dtype_bytes(dtype: str | torch.dtype) -> int:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return torch.empty((), dtype=dtype).element_size()


def meta_model(config):
    """The causal LM of ``config`` on the meta device: shapes only, nothing allocated."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _skipped(name: str, patterns: set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") or name.endswith("." + p) for p in patterns)


@dataclass(frozen=True)
class ParameterCount:
    """Parameters of a model (tied weights once, as ``model.parameters()`` counts them)."""

    total: int
    #: Weights of the ``nn.Linear`` layers bitsandbytes would quantise (not the output
    #: embeddings, layers tied to them, or ``skip_modules``) ...
    quantizable: int
    #: ... and their output rows (8-bit keeps a scale per row).
    quantizable_rows: int


def count_parameters(config, skip_modules=()) -> ParameterCount:
    """The :class:`ParameterCount` of the causal LM of ``config``, built on the meta device."""
    model = meta_model(config)
    total = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings()
    keep = {name for name, module in model.named_modules() if module is head}
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    keep |= {k.removesuffix(".weight") for pair in tied.items() for k in pair}
    keep |= set(skip_modules or ())
    head_weight = getattr(head, "weight", None)
    seen: set[int] = set()
    weights = rows = 0
    for name, module in model.named_modules():
        if type(module) is not torch.nn.Linear or _skipped(name, keep):
            continue
        if module.weight is head_weight or id(module.weight) in seen:
            continue
        seen.add(id(module.weight))
        weights += module.weight.numel()
        rows += module.out_features
    return ParameterCount(total, weights, rows)


def estimate_memory(
    config,
    dtype: str | torch.dtype = "bfloat16",
    quantization: dict | None = None,
    margin_fraction: float = MARGIN_FRACTION,
    margin_bytes: int = MARGIN_BYTES,
) -> MemoryEstimate:
    """Bytes the model of ``config`` (a transformers config) needs once loaded by palign in
    ``dtype`` with ``quantization`` (``model.quantization``: bitsandbytes settings), margin
    included; see the module docstring for the accounting."""
    q = dict(quantization or {})
    skip = q.get("llm_int8_skip_modules") or ()
    count = count_parameters(config, skip)
    total, quantizable = count.total, count.quantizable
    if q.get("load_in_4bit"):
        blocks = quantizable / BLOCKSIZE_4BIT
        if q.get("bnb_4bit_use_double_quant"):
            absmax = blocks * 1 + blocks / BLOCKSIZE_NESTED * 4
        else:
            absmax = blocks * 4
        quantized = quantizable * 0.5 + absmax
        n_quantized = quantizable
        fmt = f"{q.get('bnb_4bit_quant_type', 'fp4')} 4-bit"
    elif q.get("load_in_8bit"):
        quantized = quantizable * 1 + 4 * count.quantizable_rows
        n_quantized = quantizable
        fmt = "int8"
    else:
        quantized, n_quantized = 0, 0
        fmt = str(dtype).removeprefix("torch.")
    # k-bit preparation (finish_loading) leaves the other weights in float32.
    other_bytes = 4 if n_quantized else _dtype_bytes(dtype)
    weights = int(quantized + (total - n_quantized) * other_bytes)
    needed = int(weights * (1 + margin_fraction) + margin_bytes)
    return MemoryEstimate(total, n_quantized, weights, needed, fmt)


def device_capacity(device: str) -> tuple[str, int] | None:
    """(what, free bytes) of ``hardware.device``: one GPU, all visible GPUs (``auto``) or the
    CPU's available RAM; None when it cannot be told (no CUDA, or no psutil for the CPU)."""
    if device == "cpu":
        try:
            import psutil
        except ImportError:
            return None
        return "the CPU (available RAM)", int(psutil.virtual_memory().available)
    if not torch.cuda.is_available():
        return None
    if device == "auto":
        n = torch.cuda.device_count()
        free = sum(torch.cuda.mem_get_info(i)[0] for i in range(n))
        return f"the {n} visible GPU(s) together", int(free)
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    return f"cuda:{index}", int(torch.cuda.mem_get_info(index)[0])


def _gb(n: float) -> str:
    return f"{n / GB:.0f} GB" if n >= 10 * GB else f"{n / GB:.1f} GB"


def check_fits(
    name: str,
    config,
    dtype: str | torch.dtype = "bfloat16",
    quantization: dict | None = None,
    device: str = "cpu",
    capacity: tuple[str, int] | int | None = None,
    estimate: MemoryEstimate | None = None,
) -> MemoryEstimate:
    """Refuse, before any weight is read, a model that will not fit on ``device``.

    ``capacity``: (what, bytes) or bytes of the target, default :func:`device_capacity`
    (injectable, e.g. to test the refusal without a GPU); ``estimate``: the model's
    :func:`estimate_memory`, if already known. Raises
    :class:`~palign.errors.ModelLoadError` with one line naming ``model=<name>`` and what
    to change; returns the estimate when it fits (or when the capacity cannot be told).
    """

    estimate = estimate or estimate_memory(config, dtype, quantization)
    if isinstance(capacity, int):
        capacity = (f"{device}", capacity)
    capacity = capacity if capacity is not None else device_capacity(device)
    if capacity is None or estimate.needed_bytes <= capacity[1]:
        return estimate
    where, free = capacity
    fixes = []
    if not estimate.n_quantized:
        q4 = estimate_memory(
            config,
            dtype,
            {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
        )
        fixes.append(
            f"4-bit weights (model.quantization as in conf/model/llama3_70b_4bit.yaml: "
            f"~{_gb(q4.needed_bytes)})"
        )
    if device != "auto" and device != "cpu":
        fixes.append("hardware=multi_gpu (the model spread over all GPUs)")
    if device == "cpu":
        fixes.append("a GPU (hardware=gpu)")
    fixes.append("a smaller model")
    raise ModelLoadError(
        f"model={name}: needs ~{_gb(estimate.needed_bytes)} ({_gb(estimate.weight_bytes)} of "
        f"weights in {estimate.format} + margin for activations and KV cache) but {where} has "
        f"{_gb(free)} free; use {', '.join(fixes[:-1])}, or {fixes[-1]}"
    )


def check_fits_offline(
    name: str, source: str, dtype: str | torch.dtype, quantization: dict | None, device: str
) -> MemoryEstimate | None:
    """:func:`check_fits` for ``model.name_or_path`` ``source`` (a folder or a hub id in the
    local cache), from its config alone; None when the config is not available offline
    (loading then says that the weights are not)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, local_files_only=True)
        estimate = estimate_memory(config, dtype, quantization)
    except (OSError, ValueError):
        return None  # no config here, or an architecture transformers cannot build
    return check_fits(name, config, dtype, quantization, device, estimate=estimate)
