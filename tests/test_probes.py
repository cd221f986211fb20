"""Batched probe solver: the optimum of scikit-learn's objective, whatever the path.

References are scikit-learn fits solved to near machine precision (``newton-cholesky``,
tol 1e-10, float64): palign's float32 weights and biases must match them to 1e-4 (absolute, plus
1e-4 relative) and every train/validation accuracy must be equal. scikit-learn's default
L-BFGS stops at about 1e-3 from the optimum, so it is no exact reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from palign.pas.probes import fit_probes

TOL = {"rtol": 1e-4, "atol": 1e-4}  # float32 solve vs float64 reference


def problem(seed: int = 0, rows: int = 64, heads: int = 5, dim: int = 12):
    """3 subjects x ``heads`` heads. Head 1 nearly separates subject 0's labels (large weights),
    head 2 carries them weakly; subject 2 has 6 train rows (3 per class); all rows shifted by
    0.5 and labels unbalanced, so the intercept matters."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, heads, dim)).astype(np.float32) + 0.5
    y = (rng.random((3, rows)) < np.array([[0.5], [0.35], [0.5]])).astype(np.float32)
    x[:, 1, 0] += 4.0 * (y[0] - 0.5)
    x[:, 2, :3] += 0.8 * (y[0] - 0.5)[:, None]
    train = rng.random((3, rows)) < 0.6
    train[2] = False
    train[2, np.flatnonzero(y[2] == 1)[:3]] = True
    train[2, np.flatnonzero(y[2] == 0)[:3]] = True
    val = ~train
    return x, y, train, val


def reference(x, y, train, val, c: float = 1.0):
    """scikit-learn at (near) the optimum: weights (S, H, dim), bias, train and val accuracy."""
    subjects, (_, heads, dim) = y.shape[0], x.shape
    weight, bias = np.zeros((subjects, heads, dim)), np.zeros((subjects, heads))
    train_acc, val_acc = np.zeros((subjects, heads)), np.zeros((subjects, heads))
    for s in range(subjects):
        for h in range(heads):
            clf = LogisticRegression(C=c, solver="newton-cholesky", tol=1e-10, max_iter=100)
            clf.fit(x[train[s], h].astype(np.float64), y[s, train[s]])
            weight[s, h], bias[s, h] = clf.coef_[0], clf.intercept_[0]
            train_acc[s, h] = clf.score(x[train[s], h], y[s, train[s]])
            val_acc[s, h] = clf.score(x[val[s], h], y[s, val[s]])
    return weight, bias, train_acc, val_acc


def fit(x, y, train, val, **kwargs):
    t = torch.from_numpy
    return fit_probes(t(x), t(y), t(train), t(val), **kwargs)


@pytest.mark.parametrize("solver", ["rows", "primal", "auto"])
@pytest.mark.parametrize("c", [1.0, 30.0])
def test_matches_scikit_learn_optimum(solver, c):
    """Both Newton variants (and the automatic choice) reach scikit-learn's optimum, also with
    weak regularisation (c=30: weights above 3 on the separable head)."""
    data = problem(seed=int(c))
    weight, bias, train_acc, val_acc = reference(*data, c=c)
    got = fit(*data, c=c, solver=solver)
    assert np.abs(weight).max() > (3.0 if c > 1 else 1.0)  # the separable head is far from 0
    np.testing.assert_allclose(got.weight.numpy(), weight, **TOL)
    np.testing.assert_allclose(got.bias.numpy(), bias, **TOL)
    assert np.array_equal(got.train_acc.numpy(), train_acc.astype(np.float32))
    assert np.array_equal(got.val_acc.numpy(), val_acc.astype(np.float32))


def test_more_dims_than_rows_matches_scikit_learn():
    """Llama-like regime in small: ~20 train rows, dim 48 (data separable, row-space solve)."""
    data = problem(seed=3, rows=32, dim=48)
    weight, bias, _, val_acc = reference(*data)
    for solver in ("rows", "primal"):
        got = fit(*data, solver=solver)
        np.testing.assert_allclose(got.weight.numpy(), weight, **TOL)
        np.testing.assert_allclose(got.bias.numpy(), bias, **TOL)
        assert np.array_equal(got.val_acc.numpy(), val_acc.astype(np.float32))


def test_batched_torch_path_equals_cpu_workers():
    """The GPU-style path (one batched loop, ``workers=0``) and the CPU path (problems split into
    chunks over worker threads) solve the same problems: equal to 1e-5 and equal accuracies."""
    data = problem(seed=4, heads=7)
    threads = torch.get_num_threads()
    gpu_style = fit(*data, workers=0)
    for workers, budget in ((2, 1e9), (3, 2e5)):  # 2e5 bytes: chunks of a few problems
        cpu = fit(*data, workers=workers, budget_bytes=budget)
        np.testing.assert_allclose(cpu.weight.numpy(), gpu_style.weight.numpy(), atol=1e-5)
        np.testing.assert_allclose(cpu.bias.numpy(), gpu_style.bias.numpy(), atol=1e-5)
        assert torch.equal(cpu.train_acc, gpu_style.train_acc)
        assert torch.equal(cpu.val_acc, gpu_style.val_acc)
    assert torch.get_num_threads() == threads  # the workers' single-threading is undone


def test_float64_is_tighter():
    data = problem(seed=5)
    weight, bias, _, _ = reference(*data)
    got = fit(*data, dtype=torch.float64, tol=1e-8)
    np.testing.assert_allclose(got.weight.numpy(), weight, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got.bias.numpy(), bias, rtol=0, atol=1e-6)


@pytest.mark.parametrize("solver", ["rows", "primal"])
def test_subject_without_train_rows_or_one_class(solver):
    """No train rows: zero probe, accuracies finite; one class only: finite, predicts that class.
    Other subjects are fitted as if alone."""
    x, y, train, val = problem(seed=6)
    train[1] = False
    y[2] = np.where(train[2], 1.0, y[2])
    got = fit(x, y, train, val, solver=solver)
    alone = fit(x, y[:1], train[:1], val[:1], solver=solver)
    assert torch.equal(got.weight[1], torch.zeros_like(got.weight[1]))
    assert torch.equal(got.bias[1], torch.zeros_like(got.bias[1]))
    assert torch.isfinite(got.weight).all() and torch.isfinite(got.bias).all()
    assert torch.isfinite(got.val_acc).all() and torch.equal(got.train_acc[1], torch.zeros(5))
    assert torch.equal(got.train_acc[2], torch.ones(5))  # every train row is class 1
    np.testing.assert_allclose(got.weight[0].numpy(), alone.weight[0].numpy(), atol=1e-5)
    assert torch.equal(got.val_acc[0], alone.val_acc[0])


def test_unknown_solver_is_refused():
    with pytest.raises(ValueError, match="solver"):
        fit(*problem(), solver="lbfgs")
