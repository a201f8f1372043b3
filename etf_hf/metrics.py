"""Neural-collapse measures (NC1-NC3, ETF error, CDNV, NCC accuracy) from features and labels, streamed.

Why streaming: the measures are wanted over a whole evaluation set, and its features (N x D per
layer, for several layers) need not fit in memory. Every measure except NCC accuracy is a function of
a few sufficient statistics -- per-class counts, per-class sums, the pooled within-class scatter and
per-class squared distances to the class mean -- so `CollapseStatistics` folds each batch into those
and forgets the features. Memory is O(K D + D^2), whatever N is.

Why float64 and a centred scatter: within-class scatter is a small difference of large numbers when
features sit far from the origin compared with their spread, which is exactly the collapsed regime
these measures exist for. The shortcut sum(x x^T) - n mu mu^T cancels catastrophically there, even in
float64 (at an offset of 1e6 it is off by ~1e-3 of a unit variance). Instead each batch is centred on
its own class means in float64, and batches, accumulators and distributed ranks are combined with the
exact parallel update of Chan, Golub & LeVeque (1979): each part's scatter is re-centred on the
combined class means by adding n (mu_part - mu)(mu_part - mu)^T, a sum of positive semi-definite terms
that cannot cancel. Merging (`merge`, `+`) and the distributed reduction (`reduce`) use that same step.

Why NCC accuracy takes a second pass: it is an argmin per sample against the *final* class means, not
a function of any class moments, so no sufficient statistic yields it exactly. Pass 1
(`CollapseStatistics`) gives the means; pass 2 (`NearestClassMeanAccuracy`) streams the data again
against them. `measure_collapse` runs both passes.

Definitions (K classes, n_c samples of class c, N = sum_c n_c, features h_i with labels y_i):

  mu_c                 class mean
  mu_G                 (1/K) sum_c mu_c, the mean of the class means: the sample mean when classes are
                       balanced; with imbalanced classes it keeps class frequencies from tilting the
                       geometry, so the centred means of a simplex ETF stay a simplex ETF.
  M_c = mu_c - mu_G    centred class means; M = [M_1 ... M_K] is D x K.
  Sigma_W              (1/N) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T, within-class covariance
  Sigma_B              (1/K) M M^T, between-class covariance
  nc1                  tr(Sigma_W Sigma_B^+) / K
  nc2_equinorm         std_c ||M_c|| / mean_c ||M_c|| (population std)
  nc2_equiangular_std  population std of cos(M_c, M_c') over the pairs c < c'
  nc2_equiangular_max  max over c < c' of |cos(M_c, M_c') + 1/(K-1)|
  etf_error            || G/||G||_F - P/||P||_F ||_F with G_cc' = cos(M_c, M_c') (the Gram of the
                       normalised centred means) and P = I - 11^T/K: zero exactly when the normalised
                       centred means form a simplex ETF, whatever their scale or rotation.
  nc3_self_duality     || W^T/||W||_F - M/||M||_F ||_F for a classifier W (K x D, rows = classes, like
                       nn.Linear.weight; any bias is ignored); only when a classifier is given.
  cdnv                 mean over c < c' of (var_c + var_c') / (2 ||mu_c - mu_c'||^2), with
                       var_c = (1/n_c) sum_{y_i = c} ||h_i - mu_c||^2 (Galanti et al. 2022).
  ncc_accuracy         fraction of samples whose nearest class mean (Euclidean) is their own class's;
                       ties go to the lowest class index.

Degenerate geometry (coincident class means, a centred mean of zero norm, a zero classifier) yields nan
or inf rather than an error: it describes the features, not a misuse of the API. Misuse -- labels out
of range, a wrong feature dimension, a class with no samples -- raises ValueError.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from .etf import centering_matrix

#: A sum-reduction over ranks: sums its argument in place (like torch.distributed.all_reduce, which
#: returns None) or returns the sum.
ReduceFn = Callable[[torch.Tensor], Any]

_F64 = torch.float64

#: The `evaluate` metric script shipped with this package (package data), loadable offline.
EVALUATE_METRIC_DIR = Path(__file__).resolve().parent / "evaluate_metric" / "neural_collapse"


def _sum_reduce(fn: ReduceFn, tensor: torch.Tensor) -> torch.Tensor:
    """Apply `fn`, accepting both the in-place (all_reduce) and the returning convention."""
    result = fn(tensor)
    return result if isinstance(result, torch.Tensor) else tensor


def _as_batch(
    features: Any, labels: Any, num_classes: int, dim: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated (B, dim) float64 features and (B,) int64 labels on `device`.

    Leading dimensions (e.g. batch x tokens x dim with batch x tokens labels) are flattened. Checking
    here turns what would be an opaque indexing error, or a silently wrong class, into a message
    naming the problem.
    """
    features, labels = torch.as_tensor(features), torch.as_tensor(labels)
    if features.dim() == 0 or features.shape[-1] != dim:
        raise ValueError(f"features have shape {tuple(features.shape)}: the last dimension must be dim={dim}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if tuple(labels.shape) != tuple(features.shape[:-1]):
        raise ValueError(
            f"labels have shape {tuple(labels.shape)} but features of shape {tuple(features.shape)} "
            f"need labels of shape {tuple(features.shape[:-1])}"
        )
    x = features.reshape(-1, dim).to(device=device, dtype=_F64)
    y = labels.reshape(-1).to(device=device, dtype=torch.int64)
    out_of_range = (y < 0) | (y >= num_classes)
    if out_of_range.any():
        bad = sorted(set(y[out_of_range].tolist()))
        raise ValueError(f"labels must lie in [0, {num_classes}), got {bad[:10]}{' ...' if len(bad) > 10 else ''}")
    if not torch.isfinite(x).all():
        raise ValueError("features contain nan or inf")
    return x, y


def _class_means(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """sums / counts per class, zero for a class with no samples (whose weight is zero wherever used)."""
    return sums / counts.clamp(min=1).unsqueeze(1).to(_F64)


class CollapseStatistics:
    """Pass 1: per-class sufficient statistics of a feature stream, and every measure derived from them.

    Holds, in float64 on `device`: ``counts`` (K,), ``sums`` (K, D), ``scatter`` (D, D), the pooled
    within-class scatter sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T, and ``sq_dists`` (K,), its per-class
    trace (needed by CDNV, which weighs each class's spread separately).
    """

    def __init__(self, num_classes: int, dim: int, device: torch.device | str = "cpu") -> None:
        if num_classes < 2:
            raise ValueError(f"collapse is measured between classes: need num_classes >= 2, got {num_classes}")
        if dim < 1:
            raise ValueError(f"need a feature dimension dim >= 1, got {dim}")
        self.num_classes, self.dim, self.device = num_classes, dim, torch.device(device)
        self.counts = torch.zeros(num_classes, dtype=torch.int64, device=self.device)
        self.sums = torch.zeros(num_classes, dim, dtype=_F64, device=self.device)
        self.scatter = torch.zeros(dim, dim, dtype=_F64, device=self.device)
        self.sq_dists = torch.zeros(num_classes, dtype=_F64, device=self.device)

    @property
    def num_samples(self) -> int:
        return int(self.counts.sum())

    def update(self, features: Any, labels: Any) -> CollapseStatistics:
        """Fold in one batch: features (..., dim), integer labels (...) in [0, num_classes)."""
        x, y = _as_batch(features, labels, self.num_classes, self.dim, self.device)
        return self.merge(self._from_batch(x, y))

    def _from_batch(self, x: torch.Tensor, y: torch.Tensor) -> CollapseStatistics:
        """The statistics of one validated batch, its scatter centred on the batch's own class means."""
        batch = CollapseStatistics(self.num_classes, self.dim, self.device)
        batch.counts = torch.bincount(y, minlength=self.num_classes)
        batch.sums.index_add_(0, y, x)
        centred = x - _class_means(batch.sums, batch.counts)[y]
        batch.scatter = centred.T @ centred
        batch.sq_dists.index_add_(0, y, centred.square().sum(1))
        return batch

    def _recentred(self, means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This accumulator's scatter and per-class squared distances about `means`, not its own means.

        Adds n_c (mu_c - m_c)(mu_c - m_c)^T per class: exact, and free of cancellation because every
        added term is positive semi-definite.
        """
        offsets = _class_means(self.sums, self.counts) - means
        weights = self.counts.to(_F64)
        scatter = self.scatter + (offsets * weights.unsqueeze(1)).T @ offsets
        return scatter, self.sq_dists + weights * offsets.square().sum(1)

    def _check_compatible(self, other: CollapseStatistics) -> None:
        if not isinstance(other, CollapseStatistics):
            raise ValueError(f"can only merge a CollapseStatistics, got {type(other).__name__}")
        if (other.num_classes, other.dim) != (self.num_classes, self.dim):
            raise ValueError(
                f"cannot merge statistics of (num_classes, dim)=({other.num_classes}, {other.dim}) "
                f"into ({self.num_classes}, {self.dim})"
            )
        if other.device != self.device:
            raise ValueError(f"cannot merge statistics on {other.device} into statistics on {self.device}")

    def merge(self, other: CollapseStatistics) -> CollapseStatistics:
        """Fold `other` into this accumulator, in place, as if its batches had been streamed here."""
        self._check_compatible(other)
        counts, sums = self.counts + other.counts, self.sums + other.sums
        means = _class_means(sums, counts)
        own_scatter, own_sq = self._recentred(means)
        other_scatter, other_sq = other._recentred(means)
        self.counts, self.sums = counts, sums
        self.scatter, self.sq_dists = own_scatter + other_scatter, own_sq + other_sq
        return self

    def copy(self) -> CollapseStatistics:
        clone = CollapseStatistics(self.num_classes, self.dim, self.device)
        clone.counts, clone.sums = self.counts.clone(), self.sums.clone()
        clone.scatter, clone.sq_dists = self.scatter.clone(), self.sq_dists.clone()
        return clone

    def __add__(self, other: CollapseStatistics) -> CollapseStatistics:
        """A new accumulator holding both; neither operand changes."""
        return self.copy().merge(other)

    def reduce(self, fn: ReduceFn) -> CollapseStatistics:
        """Sum this accumulator over distributed ranks, in place, with a sum-reduction such as
        ``torch.distributed.all_reduce``.

        Scatter only adds up about common class means, so this is two rounds: counts and sums first
        (giving every rank the global means), then each rank's scatter re-centred on those means, as in
        `merge`. Like any collective, every rank must call it, in the same order.
        """
        counts = _sum_reduce(fn, self.counts.clone())
        sums = _sum_reduce(fn, self.sums.clone())
        scatter, sq_dists = self._recentred(_class_means(sums, counts))
        self.counts, self.sums = counts, sums
        self.scatter, self.sq_dists = _sum_reduce(fn, scatter), _sum_reduce(fn, sq_dists)
        return self

    def _require_every_class(self) -> None:
        empty = (self.counts == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(
                f"classes {empty[:10]}{' ...' if len(empty) > 10 else ''} have no samples: every one of "
                f"the {self.num_classes} classes needs at least one to measure collapse"
            )

    def class_means(self) -> torch.Tensor:
        """(K, D) float64 class means: what pass 2 (`NearestClassMeanAccuracy`) classifies against."""
        self._require_every_class()
        return _class_means(self.sums, self.counts)

    def compute(self, classifier: Any = None) -> dict[str, float]:
        """Every moment-based measure (see the module docstring); ``nc3_self_duality`` only when a
        classifier (K x D) is given. NCC accuracy needs a second pass: see `measure_collapse`."""
        means = self.class_means()
        centred = (means - means.mean(0)).T
        cosines = _cosine_gram(centred)
        result = {
            "nc1": _nc1(self.scatter / self.num_samples, centred),
            **_nc2(centred, cosines),
            "etf_error": _etf_error(cosines),
            "cdnv": _cdnv(means, self.sq_dists / self.counts.to(_F64)),
        }
        if classifier is not None:
            result["nc3_self_duality"] = _self_duality(self._checked_classifier(classifier), centred)
        return result

    def _checked_classifier(self, classifier: Any) -> torch.Tensor:
        weight = torch.as_tensor(classifier).detach()
        if tuple(weight.shape) != (self.num_classes, self.dim):
            raise ValueError(
                f"classifier has shape {tuple(weight.shape)}, expected (num_classes, dim)="
                f"({self.num_classes}, {self.dim}): one row per class, like nn.Linear.weight"
            )
        return weight.to(device=self.device, dtype=_F64)


def _nc1(within: torch.Tensor, centred: torch.Tensor) -> float:
    """tr(Sigma_W Sigma_B^+) / K without forming a D x D pseudo-inverse.

    With M = U S V^T, Sigma_B^+ = K U S^-2 U^T, so the measure is sum_i u_i^T Sigma_W u_i / s_i^2 over
    the kept singular directions. Kept: at most K-1 (the columns of M sum to zero, so that is its
    mathematical rank, and a rounding-level K-th value must not be inverted), and only those above
    max(D, K) * eps * s_max, numpy's matrix_rank tolerance.
    """
    left, singular, _ = torch.linalg.svd(centred, full_matrices=False)
    tolerance = max(centred.shape) * torch.finfo(_F64).eps * singular.max()
    keep = singular > tolerance
    keep[centred.shape[1] - 1:] = False
    if not keep.any():
        return math.nan
    left, singular = left[:, keep], singular[keep]
    return float(((left.T @ within @ left).diagonal() / singular.square()).sum())


def _cosine_gram(centred: torch.Tensor) -> torch.Tensor:
    """K x K cosines between the centred class means (columns of `centred`)."""
    normalised = centred / centred.norm(dim=0)
    return normalised.T @ normalised


def _nc2(centred: torch.Tensor, cosines: torch.Tensor) -> dict[str, float]:
    num_classes = centred.shape[1]
    norms = centred.norm(dim=0)
    rows, cols = torch.triu_indices(num_classes, num_classes, 1, device=cosines.device)
    pairs = cosines[rows, cols]
    return {
        "nc2_equinorm": float(norms.std(correction=0) / norms.mean()),
        "nc2_equiangular_std": float(pairs.std(correction=0)),
        "nc2_equiangular_max": float((pairs + 1.0 / (num_classes - 1)).abs().max()),
    }


def _etf_error(cosines: torch.Tensor) -> float:
    target = centering_matrix(cosines.shape[0]).to(cosines.device)
    return float(torch.linalg.norm(cosines / torch.linalg.norm(cosines) - target / torch.linalg.norm(target)))


def _cdnv(means: torch.Tensor, variances: torch.Tensor) -> float:
    """Pairwise distances by differences (torch.pdist), not from a Gram matrix, which would cancel for
    nearby means; pdist's order is the row-major upper triangle, as triu_indices'."""
    num_classes = means.shape[0]
    rows, cols = torch.triu_indices(num_classes, num_classes, 1, device=means.device)
    squared = torch.pdist(means).square()
    return float(((variances[rows] + variances[cols]) / (2 * squared)).mean())


def _self_duality(weight: torch.Tensor, centred: torch.Tensor) -> float:
    return float(torch.linalg.norm(weight.T / torch.linalg.norm(weight) - centred / torch.linalg.norm(centred)))


class NearestClassMeanAccuracy:
    """Pass 2: NCC accuracy of a feature stream against fixed class means (K x D, from pass 1).

    Holds one int64 tally [correct, total], so merging and distributed reduction are plain sums.
    """

    def __init__(self, means: Any) -> None:
        means = torch.as_tensor(means).detach()
        if means.dim() != 2 or means.shape[0] < 2:
            raise ValueError(f"means must be a (num_classes >= 2, dim) matrix, got shape {tuple(means.shape)}")
        self.means = means.to(_F64)
        self.num_classes, self.dim = means.shape
        self.device = means.device
        # Distances are compared after moving the origin to the mean of the means: translation does not
        # change the nearest mean, and it keeps the dot products below from cancelling on offset data.
        self._origin = self.means.mean(0)
        self._shifted = self.means - self._origin
        self._sq_norms = self._shifted.square().sum(1)
        self.tally = torch.zeros(2, dtype=torch.int64, device=self.device)

    def update(self, features: Any, labels: Any) -> NearestClassMeanAccuracy:
        """Classify one batch by nearest mean and count the hits."""
        x, y = _as_batch(features, labels, self.num_classes, self.dim, self.device)
        # ||x - mu||^2 minus the per-sample constant ||x||^2; argmin returns the first of tied minima.
        scores = self._sq_norms - 2 * (x - self._origin) @ self._shifted.T
        hits = (scores.argmin(1) == y).sum()
        self.tally += torch.stack([hits, torch.tensor(y.numel(), device=self.device)])
        return self

    def merge(self, other: NearestClassMeanAccuracy) -> NearestClassMeanAccuracy:
        """Fold in another stream's tally, in place; both must have classified against the same means."""
        if not isinstance(other, NearestClassMeanAccuracy) or not torch.equal(other.means, self.means):
            raise ValueError("can only merge NCC accuracies measured against the same class means")
        self.tally += other.tally
        return self

    def __add__(self, other: NearestClassMeanAccuracy) -> NearestClassMeanAccuracy:
        """A new accumulator holding both; neither operand changes."""
        total = NearestClassMeanAccuracy(self.means)
        return total.merge(self).merge(other)

    def reduce(self, fn: ReduceFn) -> NearestClassMeanAccuracy:
        """Sum the tally over distributed ranks (every rank must call it), in place."""
        self.tally = _sum_reduce(fn, self.tally.clone())
        return self

    def compute(self) -> float:
        correct, total = self.tally.tolist()
        if total == 0:
            raise ValueError("NCC accuracy of no samples: call update() with at least one batch first")
        return correct / total


#: Per-block features and labels of one batch.
BlockBatch = tuple[Sequence[torch.Tensor], torch.Tensor]


def collapse_passes(
    read: Callable[[], Iterable[BlockBatch]],
    num_classes: int,
    device: torch.device | str | None = None,
    reduce_fn: ReduceFn | None = None,
    dims: Sequence[int] | None = None,
) -> tuple[list[CollapseStatistics], list[NearestClassMeanAccuracy]]:
    """The two passes every collapse measurement makes, for any number of blocks at once.

    ``read()`` yields (features per block, labels) batches and is called once per pass: the first pass
    accumulates each block's class statistics; NCC accuracy needs the *final* class means, so the second
    pass reads the data again. With ``reduce_fn`` (a sum all-reduce) each rank streams its own shard and
    both passes are of the union. Statistics live on ``device`` (default: the first batch's features'), one
    per block of the first batch, or of ``dims`` (each block's feature dimension) when given.
    """
    statistics = [CollapseStatistics(num_classes, dim, device or "cpu") for dim in dims or ()]
    for features, labels in read():
        if not statistics:
            statistics = [CollapseStatistics(num_classes, f.shape[-1], device or f.device) for f in features]
        for block, f in zip(statistics, features):
            block.update(f, labels)
    if not statistics:
        raise ValueError("the data yielded no batch: collapse needs at least one")
    if reduce_fn is not None:
        for block in statistics:
            block.reduce(reduce_fn)
    accuracies = [NearestClassMeanAccuracy(block.class_means()) for block in statistics]
    for features, labels in read():
        for accuracy, f in zip(accuracies, features):
            accuracy.update(f, labels)
    if reduce_fn is not None:
        for accuracy in accuracies:
            accuracy.reduce(reduce_fn)
    return statistics, accuracies


def measure_collapse(
    batches: Iterable[tuple[Any, Any]],
    num_classes: int,
    dim: int,
    classifier: Any = None,
    device: torch.device | str = "cpu",
    reduce_fn: ReduceFn | None = None,
) -> dict[str, float]:
    """Both passes (`collapse_passes`) over (features, labels) `batches` of one block: every measure of
    `CollapseStatistics.compute` plus ``ncc_accuracy``.

    `batches` is iterated twice, so it must be re-iterable (a list, a DataLoader), not a generator.
    With `reduce_fn` (e.g. torch.distributed.all_reduce) each rank streams its own shard and every
    measure is of the union; every rank must call this.
    """
    if iter(batches) is batches:
        raise ValueError(
            "batches is a one-shot iterator, but NCC accuracy needs a second pass: pass a list or DataLoader"
        )
    (statistics,), (accuracy,) = collapse_passes(lambda: (([features], labels) for features, labels in batches),
                                                 num_classes, device, reduce_fn, dims=[dim])
    return {**statistics.compute(classifier), "ncc_accuracy": accuracy.compute()}


def load_evaluate_metric(**kwargs: Any) -> Any:
    """The ``neural_collapse`` `evaluate` metric (features + labels -> every measure above), loaded from the
    copy in this package, so it needs no Hub access: ``evaluate.load(EVALUATE_METRIC_DIR, **kwargs)``
    (``kwargs`` as for `evaluate.load`, e.g. ``num_process``/``process_id`` for distributed use)."""
    import evaluate  # imported here: it pulls in `datasets`, which nothing else in etf_hf needs at import

    return evaluate.load(str(EVALUATE_METRIC_DIR), **kwargs)
