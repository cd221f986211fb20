"""PAS: Personality Activation Search (probe heads, shift the best ones along the subject's
direction, choose how far).

1. Contrastive activations of every head for the 120 alignment items answered "A" and "E"
   (subject-independent, cached: :mod:`palign.pas.activations`).
2. Labels per subject: items answered 4-5 label the "A" row 1 and the "E" row 0; 1-2 the reverse;
   3 and missing are skipped.
3. One logistic probe per head on a seeded 60/40 split (by item; ``split=row`` under the paper
   protocol); the top K heads by validation accuracy (``ranking=mean_train_val``, ties to the
   last head, under the paper protocol).
4. Per kept head a unit mass-mean direction (or the probe's weights) and sigma.
5. Shift each kept head by ``alpha * sigma * direction`` at every position, answering with the
   subject's 120 answers as few-shot context in the system prompt (``with_context``; always
   under the paper protocol, where alpha = 0 is the few-shot baseline) or without.
6. ``selection=alignment_items`` (clean): alpha chosen by k-fold over the subject's own 120 items
   (fit on the other folds, score the held-out items); test items are never read.
   ``selection=test_items`` (paper): the test items are answered under every alpha and the
   evaluation chooses among these :class:`Candidates` on the test answers, as the reference code;
   the row and the report say so.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from palign.constants import TRAITS
from palign.data.papi import Item, Subject
from palign.errors import PASError
from palign.eval.metrics import best_candidate
from palign.eval.prompts import NEUTRAL_SYSTEM_PROMPT, few_shot_system_prompt
from palign.eval.records import ResultRow
from palign.methods.base import (
    Answers,
    Artifact,
    Candidates,
    Method,
    MethodContext,
    MethodSettings,
    setting,
)
from palign.methods.checks import (
    check_bool,
    check_numbers,
    check_seed,
    choice,
    fail,
    integer,
    is_int,
    number,
)
from palign.pas.activations import SHAPES, contrastive_activations
from palign.pas.heads import HeadShift, head_layout
from palign.pas.probes import (
    SPLITS,
    TIES,
    fit_probes,
    mass_mean_directions,
    projection_sigma,
    rank_heads,
    split_rows,
)
from palign.pas.profile import POOLED, PASProfile

SELECTIONS = ("alignment_items", "test_items")
DIRECTIONS = ("mass_mean", "probe")
RANKINGS = ("val", "mean_train_val")
#: Alignment items of a subject (PAPI's split): what the probes and the alpha folds divide.
ALIGNMENT_ITEMS = 120


def check_layers(key: str, layers: object, error: type[PASError] = PASError) -> list[int] | None:
    """``method.layers``: null (all layers) or ``[first, last)`` with ``0 <= first < last`` (the
    model's layer count bounds ``last`` at set-up)."""
    if layers is None:
        return None
    if (
        isinstance(layers, str)
        or not isinstance(layers, Sequence)
        or len(layers) != 2
        or not all(is_int(v) for v in layers)
        or not 0 <= layers[0] < layers[1]
    ):
        raise fail(key, layers, "null or [first, last) with 0 <= first < last", error)
    return [int(layers[0]), int(layers[1])]


@dataclass
class PASSettings(MethodSettings):
    """PAS's settings. Those that ``follow`` a ``protocol.pas`` key take the protocol's value in
    a run (``conf/protocol/paper.yaml`` sets the reference's; the defaults here are clean's)."""

    error = PASError

    top_k: int = setting(24, "heads shifted: the top K by probe accuracy", integer(1))
    alphas: list[float] = setting(
        [0, 1, 2, 4, 6, 8],
        "candidate strengths alpha (each kept head shifted by alpha * sigma along its direction)",
        check_numbers,
    )
    folds: int = setting(
        4,
        "k of the k-fold choice of alpha on the alignment items (selection=alignment_items)",
        integer(),
    )
    selection: str = setting(
        "alignment_items",
        "where alpha is chosen: alignment_items (k-fold on the subject's 120 items; clean) or "
        "test_items (the reference's choice on the test answers; paper)",
        choice(*SELECTIONS),
        follows="protocol.pas.selection",
    )
    ranking: str = setting(
        "val",
        "head ranking: val (validation accuracy; clean) or mean_train_val (paper)",
        choice(*RANKINGS),
        follows="protocol.pas.ranking",
    )
    direction: str = setting(
        "mass_mean",
        "shift direction: mass_mean (difference of class means) or probe (the probe's weights)",
        choice(*DIRECTIONS),
    )
    per_trait: bool = setting(
        False, "one intervention per trait, applied to that trait's items", check_bool
    )
    with_context: bool = setting(
        False,
        "answer with the subject's 120 answers as few-shot context too (always under paper)",
        check_bool,
        follows="protocol.pas.with_context",
    )
    split: str = setting(
        "item",
        "probe train/validation split: by item (an item's A and E rows on one side; clean) or "
        "by row (paper)",
        choice(*SPLITS),
        follows="protocol.pas.split",
    )
    ties: str = setting(
        "first",
        "equal probe accuracies: the first or the last head first (paper: last)",
        choice(*TIES),
        follows="protocol.pas.ties",
    )
    contrastive: str = setting(
        "scoring",
        "contrastive prompts shaped as scoring reads answers (clean) or as the reference (paper)",
        choice(*SHAPES),
        follows="protocol.pas.contrastive",
    )
    layers: list[int] | None = setting(
        None, "[first, last) layers of the candidate heads; null: all layers", check_layers
    )
    train_fraction: float = setting(
        0.6, "share of items (or rows) the probes train on", number(above=0, below=1)
    )
    probe_c: float = setting(1.0, "inverse L2 strength of the logistic probes", number(above=0))
    subject_batch: int = setting(
        8, "subjects per batched probe fit and per scorer run (rows x variants)", integer(1)
    )
    seed: int = setting(0, "seed of the probe splits and alpha folds", check_seed, follows="seed")

    def check_all(self) -> None:
        if self.selection == "alignment_items" and not 2 <= self.folds <= ALIGNMENT_ITEMS:
            raise fail(
                "folds",
                self.folds,
                f"an integer in 2..{ALIGNMENT_ITEMS} (k-fold alpha selection splits the "
                f"{ALIGNMENT_ITEMS} alignment items into folds)",
                PASError,
            )
        if not 1 <= round(self.train_fraction * ALIGNMENT_ITEMS) <= ALIGNMENT_ITEMS - 1:
            raise fail(
                "train_fraction",
                self.train_fraction,
                f"a number in (0, 1) that leaves at least one of the {ALIGNMENT_ITEMS} alignment "
                "items on each side of the probe train/validation split",
                PASError,
            )


@dataclass
class PASArtifact(Artifact):
    """A subject's :class:`PASProfile` (saved as ``profile.safetensors`` + ``profile.json``) and
    the validation accuracy of every head's probe, ``head_accuracy`` (groups, layers, heads) with
    groups 1 (pooled) or 5 (per trait, A..O; NaN where a trait had no labelled item), saved as
    ``head_accuracy.npy``."""

    profile: PASProfile | None = None
    head_accuracy: np.ndarray | None = None

    def choose(self, name: str, value: float) -> None:
        super().choose(name, value)
        if name == "alpha":
            self.profile.alpha = value

    def applied(self, loaded, alpha: float | None = None) -> HeadShift:
        """The profile's heads shifted for the block (:meth:`PASProfile.applied`)."""
        return self.profile.applied(loaded, alpha)

    def save(self, directory: Path) -> None:
        super().save(directory)
        self.profile.save(directory / "profile")
        if self.head_accuracy is not None:
            np.save(directory / "head_accuracy.npy", self.head_accuracy)


class PAS(Method):
    """Personality Activation Search: probe every attention head, shift the top K along the
    subject's direction by alpha * sigma, choose alpha (see the module docstring).

    ``subject_batch`` subjects are aligned and evaluated together (their probes in one batched
    fit, their shifted heads as per-row variants of one forward)."""

    name = "pas"
    uses_llm = True
    replies = True
    Settings = PASSettings

    @property
    def selects_on_alignment_items(self) -> bool:
        return self.selection == "alignment_items"

    # --- set-up: activations shared by all subjects ------------------------------------------

    def setup(self, context: MethodContext) -> None:
        self.attach(context)
        self.load_activations()

    def attach(self, context: MethodContext) -> None:
        """What scoring under shifts needs, without a forward: the context, the model's heads
        and the alignment items, the settings checked against them (also used by
        :class:`~palign.methods.pas_soup.PASSoup`, which fits only when its cache lacks the
        experts)."""
        super().setup(context)
        self.layout = head_layout(context.scorer.loaded.model)
        self.items = context.data.inventory.train_items
        if self.selection == "alignment_items" and self.folds > len(self.items):
            raise fail(
                "folds",
                self.folds,
                f"an integer in 2..{len(self.items)} (the alignment items)",
                PASError,
            )
        n_layers, n_heads, _ = self.layout.shape
        first, last = self.layers or (0, n_layers)
        if not 0 <= first < last <= n_layers:
            raise PASError(f"method.layers={list(self.layers)} is not a range within 0..{n_layers}")
        layer_of_head = torch.arange(n_layers).repeat_interleave(n_heads)
        self.allowed = (layer_of_head >= first) & (layer_of_head < last)
        if self.top_k > int(self.allowed.sum()):
            raise PASError(
                f"method.top_k={self.top_k} exceeds the {int(self.allowed.sum())} candidate heads"
            )

    def load_activations(self) -> None:
        """What the probes fit on: every head's contrastive activations (forwards unless
        cached), as rows ``(2 * items, layers * heads, head_dim)`` on the model's device."""
        scorer = self.context.scorer
        start = time.perf_counter()
        acts = contrastive_activations(scorer, self.layout, self.items, shape=self.contrastive)
        self.activation_s = time.perf_counter() - start
        n_layers, n_heads, dim = self.layout.shape
        device = scorer.loaded.device
        self.x = acts.reshape(2 * len(self.items), n_layers * n_heads, dim).to(device)
        self.item_of_row = np.repeat(np.arange(len(self.items)), 2)
        self.trait_of_row = np.array([TRAITS.index(it.trait) for it in self.items]).repeat(2)

    # --- fitting ---------------------------------------------------------------------------

    def _labels(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows' labels and whether they are labelled, from raw answers to the 120 items."""
        high, low = raw >= 4, (raw >= 1) & (raw <= 2)
        is_a = np.tile([True, False], len(raw))
        labelled = np.repeat(high | low, 2)
        y = np.where(np.repeat(high, 2), is_a, ~is_a) & labelled
        return y.astype(np.float32), labelled

    def fit_group(
        self, subjects: Sequence[Subject], usable: np.ndarray, seed: int
    ) -> tuple[list[tuple[PASProfile, np.ndarray]], float]:
        """Probe, rank and build directions for every subject at once, from the items where
        ``usable`` (subjects, 120) is True. Returns, per subject, the profile and every head's
        probe validation accuracy (groups, layers, heads), NaN for a group without labelled
        items; and the seconds spent on probes and directions."""
        numbers = [it.number for it in self.items]
        n_groups = len(TRAITS) if self.per_trait else 1
        ys, masks, trains = [], [], []
        for subject, use in zip(subjects, usable, strict=True):
            y, labelled = self._labels(np.where(use, subject.answers(numbers), 0))
            groups = (
                [labelled & (self.trait_of_row == t) for t in range(len(TRAITS))]
                if self.per_trait
                else [labelled]
            )
            mask = np.stack(groups)
            if not mask.any(1).all() and not self.per_trait:
                raise PASError(
                    f"case {subject.case}: no alignment answer other than 3 or missing; PAS has "
                    "nothing to fit"
                )
            seeds = [seed + g for g in range(n_groups)]
            ys.append(np.broadcast_to(y, mask.shape))
            masks.append(mask)
            trains.append(
                split_rows(self.item_of_row, mask, self.train_fraction, seeds, by=self.split)
            )
        mask, train = np.concatenate(masks), np.concatenate(trains)  # (subjects * groups, rows)
        dev = self.x.device
        yt = torch.from_numpy(np.concatenate(ys)).to(dev)
        mt, tt = torch.from_numpy(mask).to(dev), torch.from_numpy(train).to(dev)
        start = time.perf_counter()
        probes = fit_probes(self.x, yt, tt, mt & ~tt, c=self.probe_c)
        top = rank_heads(probes, self.ranking, self.top_k, self.allowed, ties=self.ties)
        if self.direction == "mass_mean":
            directions, sigma = mass_mean_directions(self.x, yt, mt)
        else:
            directions = probes.weight / probes.weight.norm(dim=-1, keepdim=True)
            sigma = projection_sigma(self.x.double(), directions.double(), mt).float()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        probe_s = time.perf_counter() - start
        accuracy = probes.val_acc.float().cpu().numpy().reshape(-1, *self.layout.shape[:2])
        accuracy[~mask.any(1)] = np.nan
        out = []
        for s, subject in enumerate(subjects):
            rows = slice(s * n_groups, (s + 1) * n_groups)
            profile = self._profile(
                subject,
                mask[rows],
                top[rows],
                directions[rows],
                sigma[rows],
                probes.train_acc[rows],
                probes.val_acc[rows],
            )
            out.append((profile, accuracy[rows]))
        return out, probe_s

    def _profile(self, subject, mask, top, directions, sigma, train_acc, val_acc) -> PASProfile:
        """One subject's profile from its groups' (pooled, or per trait) fitted heads."""
        n_heads = self.layout.n_heads
        parts = {
            k: [] for k in ("layer", "head", "trait", "direction", "sigma", "train_acc", "val_acc")
        }
        for g in range(len(mask)):
            if not mask[g].any():
                continue  # per-trait: no labelled item of this trait; its heads stay unshifted
            idx = top[g]
            d = directions[g, idx]
            bad = (
                ~torch.isfinite(d).all(-1) | (d.norm(dim=-1) == 0) | ~torch.isfinite(sigma[g, idx])
            )
            if bad.any():
                head = int(idx[bad.nonzero()[0, 0]])
                raise PASError(
                    f"case {subject.case}: the direction of head (layer {head // n_heads}, head "
                    f"{head % n_heads}) is NaN or zero; its activations do not separate the answers"
                )
            parts["layer"].append(idx // n_heads)
            parts["head"].append(idx % n_heads)
            parts["trait"].append(torch.full_like(idx, g if self.per_trait else POOLED))
            parts["direction"].append(d)
            parts["sigma"].append(sigma[g, idx])
            parts["train_acc"].append(train_acc[g, idx])
            parts["val_acc"].append(val_acc[g, idx])
        tensors = {k: torch.cat(v).cpu() for k, v in parts.items()}
        return PASProfile(
            model=self.context.scorer.loaded.name,
            shape=self.layout.shape,
            **tensors,
            meta={
                "case": subject.case,
                "top_k": self.top_k,
                "ranking": self.ranking,
                "direction_type": self.direction,
                "per_trait": self.per_trait,
                "with_context": self.with_context,
                "split": self.split,
                "ties": self.ties,
                "contrastive": self.contrastive,
                "layers": list(self.layers) if self.layers else None,
                "labelled_items": int(mask.any(0).sum() // 2),
            },
        )

    # --- scoring under shifts ----------------------------------------------------------------

    def _system_prompt(self, subject: Subject, usable: np.ndarray) -> str:
        if not self.with_context:
            return NEUTRAL_SYSTEM_PROMPT
        chosen = [it for it, u in zip(self.items, usable) if u]
        return few_shot_system_prompt(chosen, subject.answers([it.number for it in chosen]))

    def score_alphas(
        self, jobs: Sequence[tuple[PASProfile, str, Sequence[Item], Sequence[float]]]
    ) -> list[Answers]:
        """Answers for each job (profile, system prompt, items, alphas): row ``a * n + i`` of a
        job's answers is its item ``i`` under its ``alphas[a]``. Jobs that share a system prompt
        (all of them without the few-shot context) go through one scorer run, every (job,
        alpha) a variant with its own shift and prefix KV cache; a per-trait profile shifts each
        item by its own trait's heads."""
        by_system: dict[str, list[int]] = {}
        for j, job in enumerate(jobs):
            by_system.setdefault(job[1], []).append(j)
        out: list[Answers | None] = [None] * len(jobs)
        scorer = self.context.scorer
        for system, members in by_system.items():
            shifts, rows, variants, offset = [], [], [], 0
            for j in members:
                profile, _, items, alphas = jobs[j]
                groups = len(TRAITS) if profile.per_trait else 1
                shifts.append(profile.shifts(alphas))
                for a in range(len(alphas)):
                    for it in items:
                        rows.append(it)
                        trait = TRAITS.index(it.trait) if groups > 1 else 0
                        variants.append(offset + a * groups + trait)
                offset += len(alphas) * groups
            with scorer.applied(HeadShift(self.layout, torch.cat(shifts))):
                answers = scorer.score(system, rows, variants, n_variants=offset)
            start = 0
            for j in members:
                size = len(jobs[j][3]) * len(jobs[j][2])
                out[j] = answers[start : start + size]
                start += size
        return out

    def notes(self, rows: Sequence[ResultRow]) -> list[str]:
        alphas = [r.align_info["alpha"] for r in rows if "alpha" in r.align_info]
        counts = {a: alphas.count(a) for a in sorted(set(alphas))}
        chosen = ", ".join(f"{a:g}: {n}" for a, n in counts.items())
        where = (
            f"by {self.folds}-fold cross-validation on each subject's own 120 alignment items "
            "(test items never read)"
            if self.selection == "alignment_items"
            else "ON THE TEST ITEMS (protocol=paper, as the reference code; optimistic)"
        )
        notes = [
            f"PAS: top {self.top_k} heads by {self.ranking} accuracy (probe split by "
            f"{self.split}, ties to the {self.ties} head), {self.direction} directions from "
            f"{self.contrastive}-shaped contrastive prompts, "
            f"{'per-trait' if self.per_trait else 'pooled'} intervention, "
            f"{'with' if self.with_context else 'without'} the few-shot context.",
            f"PAS alpha chosen from {self.alphas} {where}; chosen alpha (subjects): {chosen}.",
        ]
        if rows:
            seconds = rows[0].timing["activations_s_amortised"]
            notes.append(f"Head activations computed once in {seconds:.1f} s (0 when cached).")
        return notes

    # --- the Method interface ----------------------------------------------------------------

    def align(self, subject: Subject, items: Sequence[Item]) -> PASArtifact:
        return self.align_group([subject], items)[0]

    def answer(self, subject: Subject, artifact: PASArtifact, items: Sequence[Item]) -> Answers:
        return self.answer_group([subject], [artifact], items)[0]

    def _fold_of(self, subject: Subject) -> np.ndarray:
        """(120,) the alpha-search fold of each alignment item, seeded by run seed and case."""
        rng = np.random.default_rng([self.seed, subject.case])
        fold_of = np.empty(len(self.items), dtype=int)
        fold_of[rng.permutation(len(self.items))] = np.arange(len(self.items)) % self.folds
        return fold_of

    def align_group(self, subjects: Sequence[Subject], items: Sequence[Item]) -> list[PASArtifact]:
        """Every subject's probes in one batched fit per fold, every subject's alpha grid on its
        held-out items in one scorer run per fold (one variant per subject and alpha)."""
        if [it.number for it in items] != [it.number for it in self.items]:
            raise PASError("PAS aligns on the inventory's alignment items it was set up with")
        start = time.perf_counter()
        probe_s = 0.0
        n, n_alphas = len(self.items), len(self.alphas)
        numbers = [it.number for it in self.items]
        metas = [{"alpha_selected_on": self.selection} for _ in subjects]
        chosen: list[float | None] = [None] * len(subjects)
        if self.selection == "alignment_items":
            fold_of = np.stack([self._fold_of(s) for s in subjects])
            predictions = np.zeros((len(subjects), n_alphas, n), dtype=np.int64)
            label = f"{self.name} case {subjects[0].case}" + (
                f" (+{len(subjects) - 1})" if len(subjects) > 1 else ""
            )
            for f in tqdm(range(self.folds), desc=f"{label} alpha search", leave=False):
                usable = fold_of != f
                fits, seconds = self.fit_group(subjects, usable, seed=self.seed + 101 * (f + 1))
                probe_s += seconds
                jobs = [
                    (
                        profile,
                        self._system_prompt(subject, use),
                        [it for it, u in zip(self.items, use) if not u],
                        self.alphas,
                    )
                    for subject, use, (profile, _) in zip(subjects, usable, fits)
                ]
                for s, answers in enumerate(self.score_alphas(jobs)):
                    predictions[s][:, ~usable[s]] = answers.scores.reshape(n_alphas, -1)
            for s, subject in enumerate(subjects):
                best, scores = best_candidate(predictions[s], subject.answers(numbers), self.items)
                alpha = chosen[s] = self.alphas[best]
                metas[s]["alpha_scores"] = dict(zip(map(str, self.alphas), scores))
                metas[s]["selection_score"] = scores[self.alphas.index(alpha)]
                metas[s]["folds"] = self.folds
        search_s = time.perf_counter() - start - probe_s
        fits, seconds = self.fit_group(subjects, np.ones((len(subjects), n), dtype=bool), self.seed)
        probe_s += seconds
        timing = {  # each subject's share of the group's time
            "probes_s": probe_s / len(subjects),
            "alpha_search_s": search_s / len(subjects),
            "activations_s_amortised": self.activation_s,
        }
        artifacts = []
        for subject, (profile, accuracy), alpha, meta in zip(subjects, fits, chosen, metas):
            profile.alpha = alpha
            profile.meta.update(meta)
            artifacts.append(
                PASArtifact(
                    case=subject.case,
                    profile=profile,
                    head_accuracy=accuracy,
                    meta={"alpha": alpha, **meta, "timing": timing},
                )
            )
        return artifacts

    def answer_group(
        self, subjects: Sequence[Subject], artifacts: Sequence[PASArtifact], items: Sequence[Item]
    ) -> list[Answers | Candidates]:
        """All subjects' items under their chosen alphas in one scorer run. Under
        ``selection=test_items`` (protocol=paper) the alpha is not chosen yet: the items are
        answered under every alpha and the evaluation chooses on the test answers (which PAS
        never sees) as :class:`Candidates`."""
        everything = np.ones(len(self.items), dtype=bool)
        jobs = [
            (
                a.profile,
                self._system_prompt(s, everything),
                items,
                self.alphas if a.profile.alpha is None else [a.profile.alpha],
            )
            for s, a in zip(subjects, artifacts, strict=True)
        ]
        out: list[Answers | Candidates] = []
        for artifact, (*_, alphas), answers in zip(artifacts, jobs, self.score_alphas(jobs)):
            per_alpha = [
                replace(answers[a * len(items) : (a + 1) * len(items)], setting=("alpha", alpha))
                for a, alpha in enumerate(alphas)
            ]
            chosen = artifact.profile.alpha is not None
            out.append(per_alpha[0] if chosen else Candidates("alpha", list(alphas), per_alpha))
        return out
