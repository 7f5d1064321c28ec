"""How heads learned from human labels are measured: the papers' protocol and an artist-disjoint one.

    (a) stratified   10-fold cross-validation stratified by quadrant, repeated with 5 seeds
                     (the protocol of Panda et al. 2018 and Louro et al. 2024 on the 4Q set)
    (b) artist       10-fold cross-validation with no artist in both the training and the test
                     part of a fold (scikit-learn's StratifiedGroupKFold), repeated with 5 seeds:
                     a head that has heard an artist's other songs learns the artist

Every figure is computed on out-of-fold predictions: each clip is predicted by a head that never
saw it (nor, under (b), its artist). Whatever a recipe chooses by looking at scores (its
regularisation, its calibration) it chooses inside the training part of each fold.

    macro_f1, accuracy       per fold, then mean and standard deviation over all folds
    per-quadrant F1,         on each repeat's out-of-fold predictions, then the mean over repeats
    confusion, ece
    ece                      expected calibration error of the quadrant probabilities: the top
                             class's confidence in 15 equal-width bins, |accuracy - confidence|
                             weighted by the bin's share of clips
    relaxing_energetic       Q3+Q4 against Q1+Q2, from the four probabilities (arousal)
    happy_sad                Q1 against Q3, on the clips of those two quadrants: the larger of
                             P(Q1) and P(Q3) (valence where arousal is high vs low)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

PROTOCOLS = ("stratified", "artist")
FOLDS = 10
SEEDS = (0, 1, 2, 3, 4)
ECE_BINS = 15

#: (features of the training clips [n, D], their labels [n], their artists [n] for an inner
#: split that keeps artists apart (None under the stratified protocol), features of the test
#: clips [m, D], a seed) -> class probabilities of the test clips [m, K]
FitPredict = Callable[[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray, int], np.ndarray]


@dataclass(frozen=True)
class Result:
    protocol: str
    macro_f1: float  # mean over folds
    macro_f1_std: float
    accuracy: float
    accuracy_std: float
    per_class_f1: list[float]  # [K], mean over repeats
    confusion: list[list[int]]  # [K, K] of the first repeat: rows true, columns predicted
    ece: float  # mean over repeats
    relaxing_energetic: dict[str, float]  # macro_f1, accuracy
    happy_sad: dict[str, float]
    folds: int

    def as_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def splits(protocol: str, labels: np.ndarray, groups: np.ndarray, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (train, test) index pairs of one repeat of ``protocol``."""
    if protocol == "stratified":
        folds = StratifiedKFold(FOLDS, shuffle=True, random_state=seed)
        return list(folds.split(np.zeros(len(labels)), labels))
    if protocol == "artist":
        folds = StratifiedGroupKFold(FOLDS, shuffle=True, random_state=seed)
        return list(folds.split(np.zeros(len(labels)), labels, groups))
    raise ValueError(f"unknown protocol {protocol!r}; one of {PROTOCOLS}")


def evaluate(
    protocol: str,
    features: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    fit_predict: FitPredict,
    *,
    seeds: tuple[int, ...] = SEEDS,
) -> Result:
    """Cross-validate ``fit_predict`` under ``protocol``. features: [n, D]; labels: [n] in 0..K-1;
    groups: [n] artist of each clip."""
    k = int(labels.max()) + 1
    fold_f1, fold_acc, class_f1, eces, confusions, re_scores, hs_scores = [], [], [], [], [], [], []
    for seed in seeds:
        probabilities = np.zeros((len(labels), k))
        for train, test in splits(protocol, labels, groups, seed):
            if protocol == "artist" and set(groups[train]) & set(groups[test]):
                raise AssertionError("an artist is in both parts of a fold")
            inner_groups = groups[train] if protocol == "artist" else None
            probabilities[test] = fit_predict(features[train], labels[train], inner_groups, features[test], seed)
            predicted = probabilities[test].argmax(axis=1)
            fold_f1.append(f1_score(labels[test], predicted, average="macro"))
            fold_acc.append(accuracy_score(labels[test], predicted))
        predicted = probabilities.argmax(axis=1)
        class_f1.append(f1_score(labels, predicted, average=None, labels=list(range(k))))
        confusions.append(confusion_matrix(labels, predicted, labels=list(range(k))))
        eces.append(expected_calibration_error(probabilities, labels))
        re_scores.append(relaxing_energetic(probabilities, labels))
        hs_scores.append(happy_sad(probabilities, labels))
    return Result(
        protocol=protocol,
        macro_f1=float(np.mean(fold_f1)),
        macro_f1_std=float(np.std(fold_f1)),
        accuracy=float(np.mean(fold_acc)),
        accuracy_std=float(np.std(fold_acc)),
        per_class_f1=[float(x) for x in np.mean(class_f1, axis=0)],
        confusion=confusions[0].tolist(),
        ece=float(np.mean(eces)),
        relaxing_energetic=_mean_dicts(re_scores),
        happy_sad=_mean_dicts(hs_scores),
        folds=len(fold_f1),
    )


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """probabilities: [n, K]; labels: [n] -> ECE of the top class's confidence in ``bins`` bins."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(ece)


def relaxing_energetic(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Low arousal (Q3, Q4) against high (Q1, Q2): the seeds' relaxing/energetic task."""
    truth = np.isin(labels, (2, 3))
    predicted = probabilities[:, 2] + probabilities[:, 3] > 0.5
    return {
        "macro_f1": float(f1_score(truth, predicted, average="macro")),
        "accuracy": float(accuracy_score(truth, predicted)),
    }


def happy_sad(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Q1 (happy) against Q3 (sad), on the clips of those quadrants: the seeds' happy/sad task."""
    kept = np.isin(labels, (0, 2))
    truth = labels[kept] == 0
    predicted = probabilities[kept, 0] > probabilities[kept, 2]
    return {
        "macro_f1": float(f1_score(truth, predicted, average="macro")),
        "accuracy": float(accuracy_score(truth, predicted)),
    }


def _mean_dicts(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}
