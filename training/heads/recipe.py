"""How a head is learned from features and labels, every choice made inside the training data.

    features [n, D]  (per clip: each statistic of each input over the clip's patches)
      -> standardise: the training rows' mean and standard deviation; columns that barely vary
         there (std < MIN_STD: the networks' dead filters, constant but for rounding) are dropped
      -> quadrant: multinomial logistic regression, its L2 strength C chosen by an inner
         cross-validation (best pooled out-of-fold macro-F1, ties to the lower log loss; artist-
         grouped when artists are given), then a temperature fitted on the inner out-of-fold
         logits of the chosen C (calibration) and the model refitted on all the training rows
      -> families: one logistic regression per family (multi-label), C chosen the same way by
         the inner log loss, Platt-scaled on its inner out-of-fold decision values

A fitted head is a :class:`pipeline.stages.heads.Member` in JSON (a standardisation, one dense
layer, a temperature or Platt scaling): what the model entry carries and the worker applies.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from scipy.special import expit, log_softmax
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from pipeline.stages.heads import encode_array

C_GRID = (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1)
INNER_FOLDS = 5
MIN_STD = 1e-4
MAX_ITER = 2000


@dataclass(frozen=True)
class Fitted:
    """A fitted member and what the fit chose (for reports)."""

    member: dict  # pipeline.stages.heads member JSON
    columns: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    weight: np.ndarray  # [d, K]
    bias: np.ndarray  # [K]
    temperature: float
    platt: tuple[np.ndarray, np.ndarray] | None
    chosen_c: list[float]

    def logits(self, features: np.ndarray) -> np.ndarray:
        return ((features[:, self.columns] - self.mean) / self.scale) @ self.weight + self.bias

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """[m, K]: the quadrant's softmax, or each family's sigmoid."""
        z = self.logits(features)
        if self.platt is None:
            return np.exp(log_softmax(z / self.temperature, axis=1))
        a, b = self.platt
        return expit(a * z + b)


def _standardise(features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    std = features.std(axis=0)
    columns = np.flatnonzero(std >= MIN_STD)
    return columns, features[:, columns].mean(axis=0), std[columns]


def _inner(labels: np.ndarray, groups: np.ndarray | None, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    if groups is None:
        return list(StratifiedKFold(INNER_FOLDS, shuffle=True, random_state=seed).split(labels, labels))
    return list(StratifiedGroupKFold(INNER_FOLDS, shuffle=True, random_state=seed).split(labels, labels, groups))


def _logistic(c: float, seed: int) -> LogisticRegression:
    return LogisticRegression(C=c, max_iter=MAX_ITER, random_state=seed)


def _fit(model: LogisticRegression, x: np.ndarray, y: np.ndarray) -> LogisticRegression:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(x, y)


def fit_quadrant(
    features: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray | None = None,
    *,
    seed: int = 0,
    c_grid: tuple[float, ...] = C_GRID,
    calibrate: bool = True,
) -> Fitted:
    """features [n, D], labels [n] in 0..3 -> the calibrated quadrant head (C from ``c_grid``).
    ``calibrate=False`` with a single C skips the inner cross-validation (temperature 1): the
    same decisions, for checks that only need the argmax."""
    columns, mean, scale = _standardise(features)
    z = (features[:, columns] - mean) / scale
    if len(c_grid) == 1 and not calibrate:
        return _quadrant_member(_fit(_logistic(c_grid[0], seed), z, labels), columns, mean, scale, 1.0, c_grid[0])
    folds = _inner(labels, groups, seed)
    best = None
    for c in c_grid:
        oof = _out_of_fold(features, labels, folds, c, seed)
        score = (f1_score(labels, oof.argmax(axis=1), average="macro"), -_nll(oof, labels))
        if best is None or score > best[0]:
            best = (score, c, oof)
    assert best is not None
    _, c, oof = best
    temperature = _temperature(oof, labels) if calibrate else 1.0
    return _quadrant_member(_fit(_logistic(c, seed), z, labels), columns, mean, scale, temperature, c)


def _quadrant_member(
    model: LogisticRegression, columns: np.ndarray, mean: np.ndarray, scale: np.ndarray, temperature: float, c: float
) -> Fitted:
    weight, bias = model.coef_.T.copy(), model.intercept_.copy()
    member = _member(columns, mean, scale, weight, bias, temperature=temperature)
    return Fitted(member, columns, mean, scale, weight, bias, temperature, None, [c])


def fit_families(
    features: np.ndarray, targets: np.ndarray, groups: np.ndarray | None = None, *, seed: int = 0
) -> Fitted:
    """features [n, D], targets [n, F] of 0/1 -> one calibrated binary head per family, as one
    layer of F outputs."""
    columns, mean, scale = _standardise(features)
    z = (features[:, columns] - mean) / scale
    weights, biases, a, b, chosen = [], [], [], [], []
    for f in range(targets.shape[1]):
        y = targets[:, f].astype(int)
        folds = _inner(y, groups, seed)
        best = None
        for c in C_GRID:
            oof = _out_of_fold(features, y, folds, c, seed)
            loss = _binary_nll(oof, y)
            if best is None or loss < best[0]:
                best = (loss, c, oof)
        assert best is not None
        _, c, oof = best
        slope, offset = _platt(oof, y)
        model = _fit(_logistic(c, seed), z, y)
        weights.append(model.coef_[0])
        biases.append(model.intercept_[0])
        a.append(slope)
        b.append(offset)
        chosen.append(c)
    weight, bias = np.stack(weights, axis=1), np.array(biases)
    platt = (np.array(a), np.array(b))
    member = _member(
        columns, mean, scale, weight, bias, platt={"a": encode_array(platt[0]), "b": encode_array(platt[1])}
    )
    return Fitted(member, columns, mean, scale, weight, bias, 1.0, platt, chosen)


def _out_of_fold(
    features: np.ndarray, y: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]], c: float, seed: int
) -> np.ndarray:
    """Decision values of each row by a model fitted without its fold, each fit standardised on
    its own training rows: [n, K] for several classes, [n] for two."""
    oof: np.ndarray | None = None
    for train, test in folds:
        columns, mean, scale = _standardise(features[train])
        x_train = (features[train][:, columns] - mean) / scale
        x_test = (features[test][:, columns] - mean) / scale
        values = _fit(_logistic(c, seed), x_train, y[train]).decision_function(x_test)
        if oof is None:
            oof = np.zeros((len(y), *values.shape[1:]))
        oof[test] = values
    assert oof is not None
    return oof


def _member(
    columns: np.ndarray,
    mean: np.ndarray,
    scale: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    **calibration: object,
) -> dict:
    """A member's JSON (pipeline.stages.heads): one standardised dense layer and its calibration."""
    return {
        "columns": encode_array(columns),
        "mean": encode_array(mean),
        "scale": encode_array(scale),
        "layers": [{"weight": encode_array(weight), "bias": encode_array(bias)}],
        **calibration,
    }


def _nll(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(-log_softmax(logits, axis=1)[np.arange(len(labels)), labels].mean())


def _binary_nll(z: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(expit(z), 1e-12, 1 - 1e-12)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def _temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature that minimises the log loss of softmax(logits / T)."""
    found = minimize_scalar(lambda log_t: _nll(logits / np.exp(log_t), labels), bounds=(-3, 3), method="bounded")
    return float(np.exp(found.x))


def _platt(z: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(a, b) minimising the log loss of sigmoid(a z + b)."""
    found = minimize(lambda ab: _binary_nll(ab[0] * z + ab[1], y), x0=np.array([1.0, 0.0]), method="Nelder-Mead")
    return float(found.x[0]), float(found.x[1])
