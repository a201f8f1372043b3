"""`neural_collapse`: an `evaluate` metric of how collapsed a set of class-labelled features is (arXiv 2412.00884).

    metric = etf_hf.metrics.load_evaluate_metric()      # = evaluate.load(<this folder>), no Hub access
    metric.add_batch(features=block_features, labels=labels)   # (batch, dim) floats, (batch,) class indices
    metric.compute(num_classes=10)    # ncc_accuracy, nc1, nc2_*, etf_error, cdnv (+ nc3_self_duality)

Why a thin wrapper: the measures are `etf_hf.metrics.measure_collapse`, so this module and the Trainer
metrics and `collapse_report` cannot disagree. `evaluate` keeps every added row (in an Arrow cache) until
`compute`, so memory is O(N dim) here; for a stream that does not fit, use `etf_hf.metrics` directly.
"""
import datasets
import evaluate
import numpy as np

from etf_hf.metrics import measure_collapse

_DESCRIPTION = """Neural-collapse measures of features h_i with integer class labels y_i: nearest-class-centre (NCC)
accuracy; NC1 = tr(Sigma_W Sigma_B^+)/K; NC2 equinorm (coefficient of variation of the centred class-mean norms)
and equiangularity (std and max deviation from -1/(K-1) of their pairwise cosines); the ETF error (distance of
their normalised cosine Gram to the simplex Gram); CDNV; and, given a classifier, NC3 self-duality. Definitions:
the docstring of etf_hf.metrics."""

_CITATION = """@article{etf_intermediate_collapse,
  title = {Leveraging Intermediate Neural Collapse with Simplex ETFs for Efficient Deep Neural Networks},
  journal = {arXiv preprint arXiv:2412.00884},
  year = {2024}
}"""

_INPUTS = """
Args:
    features: one feature vector (sequence of float) per example, all of the same length.
    labels: the example's class index (int) in [0, num_classes).
    num_classes: K; default max(labels) + 1. Every class needs at least one example.
    classifier: optional K x dim weight (rows = classes, like nn.Linear.weight) for nc3_self_duality.
Returns:
    ncc_accuracy, nc1, nc2_equinorm, nc2_equiangular_std, nc2_equiangular_max, etf_error, cdnv (floats),
    and nc3_self_duality when a classifier is given.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class NeuralCollapse(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features({"features": datasets.Sequence(datasets.Value("float64")),
                                        "labels": datasets.Value("int64")}),
            reference_urls=["https://arxiv.org/abs/2412.00884"],
        )

    def _compute(self, features: list, labels: list, num_classes: int | None = None,
                 classifier=None) -> dict[str, float]:
        if len(features) == 0:
            raise ValueError("neural_collapse: no examples were added")
        lengths = {len(row) for row in features}
        if len(lengths) != 1:
            raise ValueError(f"neural_collapse: every feature vector needs the same length, got lengths {sorted(lengths)}")
        x = np.asarray(features, dtype=np.float64)
        y = np.asarray(labels, dtype=np.int64)
        num_classes = int(y.max()) + 1 if num_classes is None else num_classes
        return measure_collapse([(x, y)], num_classes, x.shape[1], classifier=classifier)
