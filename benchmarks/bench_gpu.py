"""GPU benchmark: PAS and one DPO subject on random-weight models of Llama-3 shapes.

    python benchmarks/bench_gpu.py [--shape tiny|8b|70b] [--subjects 16] [--quant4bit] \
        [--layers N] [--dpo-steps 250] [--skip-dpo] [--json out.json]

Builds a seeded random model locally from a config (nothing is downloaded; the embedded
SmolLM2 tokenizer, so the prompts are the real ones) and runs, on the real PAPI data, the PAS
pipeline (contrastive activations with a fresh cache, probes, k-fold alpha search, evaluation on
the 180 test items, subjects in groups of ``--subject-batch``), a probe-only fit of
``--probe-subjects`` x every head of the shape on random activations, and one DPO subject at the
paper's settings (``conf/method/dpo.yaml``). Prints seconds per subject, forward calls and
tokens forwarded (counted by the model's cost meter), tokens/s, peak GPU memory and model FLOP
utilisation (MFU). Times are taken with ``torch.cuda.synchronize()`` on CUDA.

The 70B shape does not fit one 80 GB GPU in bf16, so on CUDA it is built in 4-bit by default
(``--quant4bit``, bitsandbytes nf4 with double quantisation, bf16 compute): random weights are
quantised while loading, through transformers' bitsandbytes loader from an in-memory state dict
(no checkpoint on disk; decoder layers cycle through as many distinct random weight sets as
16 GiB of host memory holds, said in the output). Layers are cut when GPU or host memory needs
it, or by ``--layers``; the output says so, and its times and memory are then the cut model's.
Defaults on CUDA: shape 8b, bf16, 16 subjects, probe-only for 300 subjects, DPO 250 steps; on
the CPU: shape tiny, float32, 2 subjects, probe-only for 8, DPO 2 steps (under a minute, so CI
keeps it working). Per-subject times are extrapolated to 300 subjects and DPO to 250 steps.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from bench_probes import synthetic  # random activations, PAPI-like labels (same folder)

from palign.data import load_papi
from palign.eval.scoring import Scorer, ScoringConfig
from palign.methods.base import MethodContext
from palign.methods.dpo import DPO
from palign.methods.pas import PAS
from palign.models import load_random
from palign.models.placement import placement_map
from palign.pas.probes import fit_probes, mass_mean_directions, rank_heads

ROOT = Path(__file__).resolve().parents[1]
PAPER_DPO_STEPS = 250
EXTRAPOLATE_TO = 300  # subjects in PAPI

_LLAMA3 = dict(
    model_type="llama",
    vocab_size=128256,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=128000,
    eos_token_id=128001,
)
SHAPES = {
    # Llama-3 structure (GQA, untied head, rope 500000) at a size that runs in seconds on a CPU;
    # vocab 49152 is the embedded tokenizer's (the smallest allowed).
    "tiny": dict(
        _LLAMA3,
        vocab_size=49152,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=16,
        num_key_value_heads=4,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "8b": dict(
        _LLAMA3,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
    ),
    "70b": dict(
        _LLAMA3,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
    ),
}

#: Dense bf16/fp16 tensor-core peak FLOP/s (no sparsity), by a piece of the device name.
PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM / HBM3
    ("H200", 989e12),
    ("A100", 312e12),
)
FLOPS_FORMULA = (
    "model FLOPs = 2 x N x tokens forwarded (inference), 2 x N x tokens (DPO reference) + "
    "6 x N x tokens (DPO training: forward + backward, the usual convention; with the base "
    "weights frozen under LoRA the backward does ~2x, not 4x); N = non-embedding parameters (embeddings "
    "and LM head left out: scoring reads one position's logits); attention-score FLOPs not counted"
)


def parameter_counts(config: dict) -> tuple[int, int, int]:
    """(non-embedding parameters, parameters per decoder layer, embedding + head parameters)."""
    h, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or h // heads
    per_layer = 2 * h * heads * head_dim + 2 * h * kv * head_dim + 3 * h * inter + 2 * h
    embeddings = config["vocab_size"] * h * (1 if config["tie_word_embeddings"] else 2)
    return config["num_hidden_layers"] * per_layer + h, per_layer, embeddings


def peak_flops(device: torch.device, dtype: str, override_tflops: float | None) -> tuple:
    """(peak FLOP/s or None, where it comes from)."""
    if override_tflops:
        return override_tflops * 1e12, f"{override_tflops:g} TFLOP/s (--peak-tflops)"
    if device.type != "cuda":
        return None, "n/a on the CPU"
    name = torch.cuda.get_device_name(device)
    if dtype not in ("bfloat16", "float16"):
        return None, f"n/a for {dtype} weights (the table holds dense bf16 peaks)"
    for key, value in PEAK_FLOPS:
        if key in name:
            return value, f"{value / 1e12:.0f} TFLOP/s dense bf16 ({name})"
    return None, f"n/a: {name} not in the peak table (pass --peak-tflops)"


def mem_available() -> float:
    """Host memory available, bytes (Linux; else the total)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


#: Host memory for distinct random decoder-layer weights of a 4-bit build; beyond it, layers
#: cycle through the weight sets that fit (70B: ~9 sets of 1.7 GB in bf16).
RANDOM_LAYER_BUDGET = 16 * 2**30


def layers_that_fit(config: dict, args, device: torch.device) -> tuple[int, str]:
    """How many decoder layers to build, and why (``''`` when all of them)."""
    full = config["num_hidden_layers"]
    if args.layers:
        n = min(args.layers, full)
        return n, f"--layers {args.layers}" if n < full else ""
    _, per_layer, embeddings = parameter_counts(config)
    size = torch.tensor([], dtype=getattr(torch, args.dtype)).element_size()
    layers = np.arange(full + 1)
    limits = {}
    if args.quant4bit:
        # nf4 with double quantisation: ~4.1 bits a weight (0.55 bytes with margin); embeddings
        # and head kept, float32 after QLoRA's preparation. Host: the random weights to quantise.
        host = embeddings * size + np.minimum(layers * per_layer, RANDOM_LAYER_BUDGET / size) * size
        limits["host memory"] = (host, 0.7 * mem_available())
        placed = embeddings * 4 + per_layer * 0.55 * layers
    else:
        placed = embeddings * size + per_layer * size * layers
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        limits["GPU memory"] = (placed, 0.75 * total)  # room for activations, KV caches, DPO
    else:
        limits["host memory"] = (placed, 0.6 * mem_available())
    n, why = full, ""
    for name, (need, have) in limits.items():
        fits = int(np.searchsorted(need, have, side="right")) - 1
        if fits < n:
            n, why = fits, f"{name}: {have / 2**30:.0f} GiB usable"
    if n < 1:
        raise SystemExit(f"bench_gpu: not even one layer of the {args.shape} shape fits ({why})")
    return n, why


def random_state_dict(model_class, hf_config, dtype: torch.dtype, seed: int) -> tuple[dict, int]:
    """Seeded random weights for every parameter (normal(0, initializer_range), norms 1), on the
    CPU; decoder layers cycle through as many distinct weight sets as fit the budget. Returns the
    state dict and the number of distinct layer sets."""
    with torch.device("meta"):
        skeleton = model_class(hf_config)
    shapes = {k: v.shape for k, v in skeleton.state_dict().items()}
    per_layer = (
        sum(math.prod(s) for k, s in shapes.items() if k.startswith("model.layers.0."))
        * torch.tensor([], dtype=dtype).element_size()
    )
    n_layers = hf_config.num_hidden_layers
    sets = max(1, min(n_layers, int(RANDOM_LAYER_BUDGET // per_layer)))
    generator = torch.Generator().manual_seed(seed)
    std = getattr(hf_config, "initializer_range", 0.02)
    made: dict[str, torch.Tensor] = {}
    state = {}
    for name, shape in shapes.items():
        match = re.match(r"model\.layers\.(\d+)\.(.*)", name)
        key = f"{int(match.group(1)) % sets}.{match.group(2)}" if match else name
        if key not in made:
            if name.endswith("norm.weight"):
                made[key] = torch.ones(shape, dtype=dtype)
            else:
                made[key] = (torch.randn(shape, generator=generator) * std).to(dtype)
        state[name] = made[key]
    return state, sets


def build_model(args, config: dict) -> tuple[object, str]:
    """The loaded model and a note on how it was built."""
    name = f"bench_{args.shape}" + ("_4bit" if args.quant4bit else "")
    if not args.quant4bit:
        loaded = load_random(name, config, seed=args.seed, dtype=args.dtype, device=args.device)
        return loaded, f"random {args.dtype} weights (palign.models.load_random, seed {args.seed})"
    # Random weights quantised while loading, as a checkpoint would be (transformers' bitsandbytes
    # path, from an in-memory state dict: no disk, and host memory for a few layers only).
    from transformers import AutoConfig, AutoTokenizer, BitsAndBytesConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from palign.models.loading import converted_gguf_dir, finish_loading

    cfg = dict(config)
    hf_config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(hf_config)]
    dtype = getattr(torch, args.dtype)
    state, sets = random_state_dict(model_class, hf_config, dtype, args.seed)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    model = model_class.from_pretrained(
        None,
        config=hf_config,
        state_dict=state,
        dtype=dtype,
        device_map=placement_map(args.device),
        quantization_config=quantization,
    )
    del state
    gc.collect()
    tokenizer = AutoTokenizer.from_pretrained(str(converted_gguf_dir()))
    shared = (
        f"; layers cycle through {sets} distinct random weight sets (host memory)"
        if sets < hf_config.num_hidden_layers
        else ""
    )
    note = f"random weights (seed {args.seed}) quantised to nf4 4-bit while loading{shared}"
    return finish_loading(model, tokenizer, name), note


class Clock:
    """Wall time, forwards counted by the meter and peak GPU memory of named phases."""

    def __init__(self, device: torch.device, meter=None):
        self.device, self.meter = device, meter
        self.phases: dict[str, dict] = {}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def phase(self, name: str):
        self.sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        before = self.meter.snapshot() if self.meter else None
        start = time.perf_counter()
        yield
        self.sync()
        seconds = time.perf_counter() - start
        row = self.phases.setdefault(
            name,
            {"seconds": 0.0, "forward_calls": 0, "tokens_forwarded": 0, "peak_mem_bytes": None},
        )
        row["seconds"] += seconds
        if before is not None:
            cost = self.meter.snapshot() - before
            row["forward_calls"] += cost.forward_calls
            row["tokens_forwarded"] += cost.tokens_forwarded
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            row["peak_mem_bytes"] = max(row["peak_mem_bytes"] or 0, peak)


def probe_fit(x, y, labelled, train, val, top_k: int) -> None:
    """What one PAS fit does for every subject: probes, ranking, mass-mean directions."""
    fit = fit_probes(x, y, train, val)
    rank_heads(fit, "val", top_k)
    mass_mean_directions(x, y, labelled)


def dpo_settings(steps: int, precision: str, seed: int) -> dict:
    """The paper's DPO settings from ``conf/method/dpo.yaml``, with ``steps``."""
    from omegaconf import OmegaConf

    settings = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/method/dpo.yaml"))
    for key in ("defaults", "_target_", "name", "seed", "precision"):
        settings.pop(key, None)
    return {**settings, "steps": steps, "precision": precision, "seed": seed}


def finite_or_none(value):
    return None if value is None or not math.isfinite(value) else value


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shape", choices=sorted(SHAPES), default=None, help="8b on CUDA, else tiny"
    )
    parser.add_argument("--layers", type=int, default=None, help="cut the shape to N layers")
    parser.add_argument("--subjects", type=int, default=None, help="16 on CUDA, else 2")
    parser.add_argument("--subject-batch", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=None, help="scoring; 32 CUDA, 16 CPU")
    parser.add_argument("--dtype", default=None, help="bfloat16 on CUDA, else float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--quant4bit",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bitsandbytes nf4 weights (default: on for 70b on CUDA)",
    )
    parser.add_argument("--probe-subjects", type=int, default=None, help="300 on CUDA, else 8")
    parser.add_argument("--skip-dpo", action="store_true")
    parser.add_argument("--dpo-steps", type=int, default=None, help="250 on CUDA, else 2")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the table")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the numbers here")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" else args.device)
    gpu = device.type == "cuda"
    args.shape = args.shape or ("8b" if gpu else "tiny")
    args.subjects = args.subjects or (16 if gpu else 2)
    args.batch_size = args.batch_size or (32 if gpu else 16)
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.probe_subjects = args.probe_subjects or (300 if gpu else 8)
    args.dpo_steps = args.dpo_steps or (PAPER_DPO_STEPS if gpu else 2)
    if args.quant4bit is None:
        args.quant4bit = gpu and args.shape == "70b"
    precision = {"bfloat16": "bf16-mixed", "float16": "16-mixed"}.get(args.dtype, "32-true")
    if not gpu:
        os.environ.setdefault("TRANSFORMERS_SDPA_FORCE_GQA", "1")  # as hardware=cpu

    full_config = SHAPES[args.shape]
    layers, cut_reason = layers_that_fit(full_config, args, device)
    config = {**full_config, "num_hidden_layers": layers}
    n_params, _, _ = parameter_counts(config)
    peak, peak_source = peak_flops(device, args.dtype, args.peak_tflops)
    data = load_papi()
    subjects = data.subjects[: args.subjects]
    train_items, test_items = data.inventory.train_items, data.inventory.test_items

    clock = Clock(device)
    with clock.phase("build"):
        loaded, build_note = build_model(args, config)
    clock.meter = loaded.meter
    start_cost = loaded.meter.snapshot()
    linear4bit = sum(type(m).__name__ == "Linear4bit" for m in loaded.model.modules())
    counted = None
    if not args.quant4bit:  # 4-bit layers hold packed weights
        skip = {id(loaded.model.get_input_embeddings().weight)}
        skip.add(id(loaded.model.get_output_embeddings().weight))
        counted = sum(p.numel() for p in loaded.model.parameters() if id(p) not in skip)
    scorer = Scorer(loaded, ScoringConfig(batch_size=args.batch_size), precision=precision)

    n_heads = layers * config["num_attention_heads"]
    top_k = min(24, n_heads)
    pas = PAS(top_k=top_k, subject_batch=args.subject_batch, seed=args.seed)
    saved_cache = os.environ.get("PALIGN_CACHE")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["PALIGN_CACHE"] = cache  # a cold activation run (the model is built above)
        try:
            with clock.phase("activations"):
                pas.setup(MethodContext(data, scorer))
        finally:
            if saved_cache is None:
                os.environ.pop("PALIGN_CACHE", None)
            else:
                os.environ["PALIGN_CACHE"] = saved_cache

    probes_s = 0.0
    for g in range(0, len(subjects), args.subject_batch):
        group = subjects[g : g + args.subject_batch]
        with clock.phase("align"):
            artifacts = pas.align_group(group, train_items)
        probes_s += sum(a.meta["timing"]["probes_s"] for a in artifacts)
        with clock.phase("evaluation"):
            pas.answer_group(group, artifacts, test_items)
    align = clock.phases.pop("align")
    clock.phases["probes"] = {
        "seconds": probes_s,
        "forward_calls": 0,
        "tokens_forwarded": 0,
        "peak_mem_bytes": align["peak_mem_bytes"],
    }
    clock.phases["alpha_search"] = {**align, "seconds": align["seconds"] - probes_s}

    # Probe-only: every head of the full shape (not cut), random activations, one PAS fit each.
    heads_full = full_config["num_hidden_layers"] * full_config["num_attention_heads"]
    head_dim = full_config["hidden_size"] // full_config["num_attention_heads"]
    probe_data = synthetic(args.probe_subjects, heads_full, head_dim, device)
    probe_top_k = min(24, heads_full)
    probe_fit(*(t[:1] if t.dim() == 2 else t for t in probe_data), top_k=probe_top_k)  # warm-up
    with clock.phase("probe_only"):
        probe_fit(*probe_data, top_k=probe_top_k)
    del probe_data

    dpo_train_steps = None
    if not args.skip_dpo:
        dpo = DPO(**dpo_settings(args.dpo_steps, precision, args.seed))
        dpo.setup(MethodContext(data, scorer))
        reference = dpo.reference_logps

        def timed_reference(batches):
            with clock.phase("dpo_reference"):
                return reference(batches)

        dpo.reference_logps = timed_reference
        with clock.phase("dpo_align"):
            artifact = dpo.align(subjects[0], train_items)
        with clock.phase("dpo_evaluation"):
            dpo.answer(subjects[0], artifact, test_items)
        dpo.teardown()
        dpo_train_steps = artifact.meta["steps"]
        both = clock.phases.pop("dpo_align")
        ref = clock.phases["dpo_reference"]
        clock.phases["dpo_train"] = {
            "seconds": both["seconds"] - ref["seconds"],
            "forward_calls": both["forward_calls"] - ref["forward_calls"],
            "tokens_forwarded": both["tokens_forwarded"] - ref["tokens_forwarded"],
            "peak_mem_bytes": both["peak_mem_bytes"],
            "steps": dpo_train_steps,
        }
    total_cost = loaded.meter.snapshot() - start_cost

    n = len(subjects)
    shares = {"activations": EXTRAPOLATE_TO, "probes": n, "alpha_search": n, "evaluation": n}
    shares.update(probe_only=args.probe_subjects, dpo_reference=1, dpo_train=1, dpo_evaluation=1)
    for name, row in clock.phases.items():
        row["seconds_per_subject"] = row["seconds"] / shares[name] if name in shares else None
        tokens = row["tokens_forwarded"]
        row["tokens_per_s"] = tokens / row["seconds"] if tokens and row["seconds"] > 0 else None
        flops = (6 if name == "dpo_train" else 2) * n_params * tokens
        row["model_flops"] = flops
        row["mfu"] = (
            finite_or_none(flops / row["seconds"] / peak)
            if peak and tokens and row["seconds"] > 0
            else None
        )
    p = clock.phases
    per_subject = {
        "activations_amortised_s": p["activations"]["seconds"] / EXTRAPOLATE_TO,
        "probes_s": p["probes"]["seconds"] / n,
        "alpha_search_s": p["alpha_search"]["seconds"] / n,
        "evaluation_s": p["evaluation"]["seconds"] / n,
    }
    per_subject["pas_total_s"] = sum(per_subject.values())
    pas_300 = p["activations"]["seconds"] + EXTRAPOLATE_TO * (
        per_subject["probes_s"] + per_subject["alpha_search_s"] + per_subject["evaluation_s"]
    )
    dpo_paper = None
    if not args.skip_dpo:
        train_per_step = p["dpo_train"]["seconds"] / dpo_train_steps
        per_subject["dpo_s"] = sum(p[k]["seconds"] for k in ("dpo_reference", "dpo_train"))
        per_subject["dpo_s"] += p["dpo_evaluation"]["seconds"]
        dpo_paper = per_subject["dpo_s"] + train_per_step * (PAPER_DPO_STEPS - dpo_train_steps)
    result = {
        "shape": args.shape,
        "layers": layers,
        "layers_full": full_config["num_hidden_layers"],
        "layers_cut_because": cut_reason or None,
        "full_depth_scale": full_config["num_hidden_layers"] / layers,
        "quant4bit": args.quant4bit,
        "linear4bit_modules": linear4bit,
        "build": build_note,
        "dtype": args.dtype,
        "precision": precision,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if gpu
        else f"{platform.machine()} CPU x{os.cpu_count()}",
        "torch": torch.__version__,
        "subjects": n,
        "subject_batch": args.subject_batch,
        "batch_size": args.batch_size,
        "pas": {"top_k": top_k, "alphas": pas.alphas, "folds": pas.folds},
        "params_non_embedding": n_params,
        "params_non_embedding_counted": counted,
        "peak_flops": peak,
        "peak_flops_source": peak_source,
        "flops_formula": FLOPS_FORMULA,
        "phases": clock.phases,
        "probe_only": {"subjects": args.probe_subjects, "heads": heads_full, "dim": head_dim},
        "per_subject": per_subject,
        "pas_300_subjects_s": pas_300,
        "pas_300_extrapolated": n != EXTRAPOLATE_TO,
        "dpo_paper_steps_s": dpo_paper,
        "dpo_extrapolated": None if args.skip_dpo else dpo_train_steps != PAPER_DPO_STEPS,
        "meter_total": total_cost.to_dict(),
        "peak_mem_bytes": max((r["peak_mem_bytes"] or 0 for r in p.values()), default=0)
        if gpu
        else None,
    }
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, allow_nan=False))
    return result


def _count(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def print_table(r: dict) -> None:
    p, s = r["phases"], r["per_subject"]
    if r["layers_cut_because"]:
        depth = (
            f"CUT to {r['layers']} of {r['layers_full']} layers ({r['layers_cut_because']}): "
            f"times, memory and FLOPs are the cut model's (full depth ~x{r['full_depth_scale']:.2f})"
        )
    else:
        depth = f"{r['layers']} layers"
    print(
        f"device: {r['device_name']}, torch {r['torch']}; shape {r['shape']}, {depth}; "
        f"{r['build']}; precision {r['precision']}; N = {_count(r['params_non_embedding'])} "
        f"non-embedding params"
    )
    print(
        f"PAS (clean): {r['subjects']} subjects in groups of {r['subject_batch']}, scoring batch "
        f"{r['batch_size']}, top {r['pas']['top_k']} heads, {r['pas']['folds']} folds, alphas "
        f"{[f'{a:g}' for a in r['pas']['alphas']]}"
    )

    def fmt(value, spec, unit=""):
        return "n/a" if value is None else format(value, spec) + unit

    folds = r["pas"]["folds"]
    po = r["probe_only"]
    rows = [
        ("model build", "build"),
        (f"activations (once per model, 240 prompts; s/subject: /{EXTRAPOLATE_TO})", "activations"),
        (f"probes in PAS ({folds + 1} fits a subject)", "probes"),
        (
            f"alpha search ({folds} folds x {len(r['pas']['alphas'])} alphas, held-out items)",
            "alpha_search",
        ),
        ("evaluation (180 test items, chosen alpha)", "evaluation"),
        (
            f"probe-only: {po['subjects']} subjects x {po['heads']} heads x {po['dim']} "
            "(1 fit each, random activations)",
            "probe_only",
        ),
    ]
    if "dpo_train" in p:
        rows += [
            ("DPO reference log-probs (1 subject)", "dpo_reference"),
            (f"DPO training, {p['dpo_train']['steps']} steps (1 subject)", "dpo_train"),
            ("DPO evaluation (180 test items)", "dpo_evaluation"),
        ]
    print(
        "| phase | seconds | s / subject | forward calls | tokens forwarded | tokens/s | MFU | "
        "peak GPU mem |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label, key in rows:
        row = p[key]
        mfu = None if row["mfu"] is None else 100 * row["mfu"]
        mem = None if row["peak_mem_bytes"] is None else row["peak_mem_bytes"] / 2**30
        print(
            f"| {label} | {row['seconds']:.2f} | {fmt(row['seconds_per_subject'], '.3f')} | "
            f"{row['forward_calls']} | {row['tokens_forwarded']} | "
            f"{fmt(row['tokens_per_s'], '.0f')} | {fmt(mfu, '.1f', ' %')} | "
            f"{fmt(mem, '.1f', ' GiB')} |"
        )
    print(
        f"| PAS total per subject (activations /{EXTRAPOLATE_TO}) | | {s['pas_total_s']:.3f} "
        "| | | | | |"
    )
    how = "extrapolated" if r["pas_300_extrapolated"] else "measured"
    print(
        f"PAS for {EXTRAPOLATE_TO} subjects: {r['pas_300_subjects_s'] / 60:.2f} min ({how} from "
        f"{r['subjects']} subjects; target, 8B bf16 on one H100: <= 10 min). Probes target: "
        f"{EXTRAPOLATE_TO} subjects x 1024 heads <= 60 s (the probe-only row at that size)."
    )
    if r["dpo_paper_steps_s"] is not None:
        how = "extrapolated linearly in steps" if r["dpo_extrapolated"] else "measured"
        print(
            f"DPO per subject at the paper's {PAPER_DPO_STEPS} steps: {r['dpo_paper_steps_s']:.1f} s "
            f"({how}; reference + training + evaluation; target <= 120 s)"
        )
    total = r["meter_total"]
    print(
        f"counted by the meter: {total['forward_calls']} forward calls, "
        f"{total['tokens_forwarded']} tokens forwarded (padding included); peak GPU memory "
        f"{fmt(r['peak_mem_bytes'] and r['peak_mem_bytes'] / 2**30, '.1f', ' GiB')}"
    )
    print(
        f"MFU: {r['flops_formula']}; peak: {r['peak_flops_source']}; target >= 40 % in evaluation"
    )


if __name__ == "__main__":
    main()
