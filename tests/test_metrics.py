"""Neural-collapse measures: exact values on a simplex ETF, chance-level NCC on noise, agreement with an
independent one-shot numpy reference, streaming/merge/reduce invariance, and clear errors on misuse."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from etf_hf import simplex_etf
from etf_hf.metrics import CollapseStatistics, NearestClassMeanAccuracy, measure_collapse

MOMENT_KEYS = ("nc1", "nc2_equinorm", "nc2_equiangular_std", "nc2_equiangular_max", "etf_error", "cdnv")


def reference_measures(
    features: np.ndarray, labels: np.ndarray, num_classes: int, classifier: np.ndarray
) -> dict[str, float]:
    """The definitions of etf_hf.metrics written directly: all features in memory, float64 numpy."""
    features = features.astype(np.float64)
    means = np.stack([features[labels == c].mean(0) for c in range(num_classes)])
    centred = (means - means.mean(0)).T  # D x K
    residuals = features - means[labels]
    sigma_w = residuals.T @ residuals / len(features)
    sigma_b = centred @ centred.T / num_classes
    norms = np.linalg.norm(centred, axis=0)
    unit = centred / norms
    gram = unit.T @ unit
    pairs = np.array([gram[i, j] for i in range(num_classes) for j in range(i + 1, num_classes)])
    simplex = np.eye(num_classes) - 1.0 / num_classes
    variances = [np.mean(np.sum((features[labels == c] - means[c]) ** 2, axis=1)) for c in range(num_classes)]
    cdnv = [
        (variances[i] + variances[j]) / (2 * np.sum((means[i] - means[j]) ** 2))
        for i in range(num_classes) for j in range(i + 1, num_classes)
    ]
    distances = np.linalg.norm(features[:, None, :] - means[None, :, :], axis=2)
    return {
        "nc1": np.trace(sigma_w @ np.linalg.pinv(sigma_b, rcond=1e-10)) / num_classes,
        "nc2_equinorm": norms.std() / norms.mean(),
        "nc2_equiangular_std": pairs.std(),
        "nc2_equiangular_max": np.abs(pairs + 1.0 / (num_classes - 1)).max(),
        "etf_error": np.linalg.norm(gram / np.linalg.norm(gram) - simplex / np.linalg.norm(simplex)),
        "nc3_self_duality": np.linalg.norm(
            classifier.T / np.linalg.norm(classifier) - centred / np.linalg.norm(centred)
        ),
        "cdnv": np.mean(cdnv),
        "ncc_accuracy": np.mean(distances.argmin(1) == labels),
    }


def clustered_data(num_samples: int, num_classes: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian clusters with unequal spreads, sizes and separations: every measure is non-trivial."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(num_classes, (num_samples,), generator=generator)
    centres = 2.0 * torch.randn(num_classes, dim, generator=generator, dtype=torch.float64)
    spreads = 0.5 + torch.rand(num_classes, generator=generator, dtype=torch.float64)
    noise = torch.randn(num_samples, dim, generator=generator, dtype=torch.float64)
    return centres[labels] + spreads[labels, None] * noise, labels


def one_shot(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> CollapseStatistics:
    return CollapseStatistics(num_classes, features.shape[1]).update(features, labels)


def assert_same_measures(first: dict[str, float], second: dict[str, float], rtol: float = 1e-9) -> None:
    assert first.keys() == second.keys()
    for key in first:
        assert first[key] == pytest.approx(second[key], rel=rtol, abs=1e-12), key


@pytest.mark.parametrize("num_classes,dim", [(4, 3), (6, 16), (10, 64)])
@pytest.mark.parametrize("scale", [1.0, 7.5])
def test_exact_simplex_features_are_fully_collapsed(num_classes: int, dim: int, scale: float) -> None:
    frame = simplex_etf(num_classes, dim, "orthogonal", seed=1)  # D x K
    labels = torch.arange(num_classes).repeat_interleave(torch.arange(3, 3 + num_classes))  # imbalanced
    features = scale * frame.T[labels]
    measures = measure_collapse([(features, labels)], num_classes, dim, classifier=frame.T)
    assert measures["ncc_accuracy"] == 1.0
    assert abs(measures["nc1"]) < 1e-9
    # the float32 frame is a simplex ETF to float32 rounding only; the float64 test below pins 1e-9
    assert measures["nc2_equinorm"] < 1e-6
    assert measures["nc2_equiangular_max"] < 1e-6 and measures["nc2_equiangular_std"] < 1e-6
    assert measures["etf_error"] < 1e-6
    assert measures["nc3_self_duality"] < 1e-6
    assert measures["cdnv"] < 1e-9


def test_float64_simplex_is_exact_to_1e_9() -> None:
    frame = simplex_etf(5, 8, "orthogonal", seed=2, dtype=torch.float64)
    labels = torch.arange(5).repeat(4)
    measures = measure_collapse([(3.0 * frame.T[labels], labels)], 5, 8, classifier=frame.T)
    for key in (*MOMENT_KEYS, "nc3_self_duality"):
        assert abs(measures[key]) < 1e-9, key
    assert measures["ncc_accuracy"] == 1.0


def test_noise_with_random_labels_gives_chance_ncc() -> None:
    num_samples, num_classes = 4000, 10
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(num_samples, 16, generator=generator)
    labels = torch.randint(num_classes, (num_samples,), generator=generator)
    accuracy = measure_collapse([(features, labels)], num_classes, 16)["ncc_accuracy"]
    # chance 0.1, binomial std ~0.0047; means fitted on the same data add a small optimistic bias
    assert abs(accuracy - 1 / num_classes) < 0.04


@pytest.mark.parametrize("num_classes,dim", [(5, 12), (8, 4), (3, 40)])  # includes D < K-1
def test_every_measure_matches_the_numpy_reference(num_classes: int, dim: int) -> None:
    features, labels = clustered_data(600, num_classes, dim, seed=num_classes)
    classifier = torch.randn(num_classes, dim, dtype=torch.float64)
    batches = list(zip(features.split(97), labels.split(97)))
    measures = measure_collapse(batches, num_classes, dim, classifier=classifier)
    expected = reference_measures(features.numpy(), labels.numpy(), num_classes, classifier.numpy())
    assert measures.keys() == expected.keys()
    for key, value in expected.items():
        assert measures[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_streaming_many_ragged_batches_equals_one_shot() -> None:
    features, labels = clustered_data(500, 6, 10, seed=3)
    streamed = CollapseStatistics(6, 10)
    start = 0
    for size in [1, 2, 50, 1, 3, 143, 7, 0, 200, 93]:  # small batches miss classes; an empty one is a no-op
        streamed.update(features[start:start + size], labels[start:start + size])
        start += size
    assert start == 500 and streamed.num_samples == 500
    whole = one_shot(features, labels, 6)
    assert_same_measures(streamed.compute(), whole.compute())
    assert torch.allclose(streamed.scatter, whole.scatter, rtol=1e-12, atol=1e-9)


def test_float32_batches_and_token_shaped_inputs_are_accepted() -> None:
    features, labels = clustered_data(120, 4, 6, seed=4)
    tokens = one_shot(features.float(), labels, 4).compute()
    shaped = CollapseStatistics(4, 6).update(features.float().reshape(12, 10, 6), labels.reshape(12, 10)).compute()
    assert_same_measures(tokens, shaped)


def test_merge_of_two_halves_equals_the_whole() -> None:
    features, labels = clustered_data(400, 5, 8, seed=5)
    # the first half lacks class 4 entirely: merge must still place its scatter correctly
    in_first = labels != 4
    first = one_shot(features[in_first][:150], labels[in_first][:150], 5)
    rest_features = torch.cat([features[in_first][150:], features[~in_first]])
    rest_labels = torch.cat([labels[in_first][150:], labels[~in_first]])
    second = one_shot(rest_features, rest_labels, 5)
    whole = one_shot(features, labels, 5)
    merged = first + second
    assert first.num_samples == 150 and merged.num_samples == 400  # + leaves its operands alone
    assert_same_measures(merged.compute(), whole.compute())
    assert_same_measures(first.merge(second).compute(), whole.compute())


def test_a_large_common_offset_changes_nothing() -> None:
    """The naive sum(x x^T) - n mu mu^T is off by ~1e-3 of a unit variance at offset 1e6; centred batches are not."""
    features, labels = clustered_data(300, 4, 5, seed=6)
    batches = list(zip(features.split(31), labels.split(31)))
    shifted = [(x + 1e6, y) for x, y in batches]
    assert_same_measures(measure_collapse(batches, 4, 5), measure_collapse(shifted, 4, 5), rtol=1e-7)


def run_ranks(world_size: int, work, returning: bool) -> list:
    """Run work(rank, fn) in one thread per rank, fn being a barrier-synchronised sum over ranks."""
    slots: list = [None] * world_size
    barrier = threading.Barrier(world_size)
    results: list = [None] * world_size
    errors: list = []

    def sum_over_ranks(rank: int):
        def fn(tensor: torch.Tensor):
            slots[rank] = tensor.clone()
            barrier.wait()
            total = sum(slots)
            barrier.wait()
            if returning:
                return total
            tensor.copy_(total)  # like torch.distributed.all_reduce: in place, returns None
            return None
        return fn

    def target(rank: int) -> None:
        try:
            results[rank] = work(rank, sum_over_ranks(rank))
        except BaseException as error:  # surfaced below; abort so the other ranks do not wait forever
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=target, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("returning", [False, True], ids=["in_place", "returning"])
def test_reduce_over_ranks_equals_the_whole(returning: bool) -> None:
    features, labels = clustered_data(450, 5, 7, seed=7)
    shards = [(features[rank::3], labels[rank::3]) for rank in range(3)]
    classifier = torch.randn(5, 7, dtype=torch.float64)

    def work(rank: int, fn):
        x, y = shards[rank]
        return measure_collapse(list(zip(x.split(40), y.split(40))), 5, 7, classifier=classifier, reduce_fn=fn)

    expected = measure_collapse([(features, labels)], 5, 7, classifier=classifier)
    for measures in run_ranks(3, work, returning):
        assert_same_measures(measures, expected)


def test_ncc_accumulators_merge() -> None:
    features, labels = clustered_data(200, 4, 6, seed=8)
    means = one_shot(features, labels, 4).class_means()
    whole = NearestClassMeanAccuracy(means).update(features, labels)
    first = NearestClassMeanAccuracy(means).update(features[:70], labels[:70])
    second = NearestClassMeanAccuracy(means).update(features[70:], labels[70:])
    assert (first + second).compute() == whole.compute()
    assert first.tally.tolist()[1] == 70
    with pytest.raises(ValueError, match="same class means"):
        first.merge(NearestClassMeanAccuracy(means + 1))


def test_labels_out_of_range_are_named() -> None:
    statistics = CollapseStatistics(3, 4)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), got \[3\]"):
        statistics.update(torch.randn(2, 4), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"got \[-1\]"):
        statistics.update(torch.randn(2, 4), torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="integer class indices"):
        statistics.update(torch.randn(2, 4), torch.tensor([0.0, 1.0]))
    assert statistics.num_samples == 0  # a rejected batch leaves nothing behind


def test_wrong_feature_dimension_and_shape_mismatch() -> None:
    statistics = CollapseStatistics(3, 4)
    with pytest.raises(ValueError, match="last dimension must be dim=4"):
        statistics.update(torch.randn(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="need labels of shape"):
        statistics.update(torch.randn(2, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="nan or inf"):
        statistics.update(torch.tensor([[float("nan")] * 4]), torch.tensor([0]))
    with pytest.raises(ValueError, match="last dimension must be dim=4"):
        NearestClassMeanAccuracy(torch.randn(3, 4)).update(torch.randn(2, 3), torch.tensor([0, 1]))


def test_a_class_with_no_samples_is_named_when_computing() -> None:
    statistics = CollapseStatistics(4, 3).update(torch.randn(6, 3), torch.tensor([0, 1, 3, 0, 1, 3]))
    with pytest.raises(ValueError, match=r"classes \[2\] have no samples"):
        statistics.compute()
    with pytest.raises(ValueError, match=r"classes \[2\] have no samples"):
        measure_collapse([(torch.randn(3, 3), torch.tensor([0, 1, 3]))], 4, 3)


def test_misuse_of_construction_merge_classifier_and_passes() -> None:
    with pytest.raises(ValueError, match="num_classes >= 2"):
        CollapseStatistics(1, 4)
    with pytest.raises(ValueError, match=r"\(num_classes, dim\)=\(3, 5\) into \(3, 4\)"):
        CollapseStatistics(3, 4).merge(CollapseStatistics(3, 5))
    features, labels = clustered_data(30, 3, 4, seed=9)
    with pytest.raises(ValueError, match=r"classifier has shape \(4, 3\), expected"):
        one_shot(features, labels, 3).compute(classifier=torch.randn(4, 3))
    with pytest.raises(ValueError, match="second pass"):
        measure_collapse(iter([(features, labels)]), 3, 4)
    with pytest.raises(ValueError, match="no samples"):
        NearestClassMeanAccuracy(torch.randn(3, 4)).compute()


def test_evaluate_module_loads_offline_and_equals_the_streaming_statistics() -> None:
    """`evaluate.load` on the shipped script (and the helper doing the same), two add_batch calls, then
    compute: equal to CollapseStatistics + NearestClassMeanAccuracy streamed over the same two arrays."""
    import evaluate

    from etf_hf.metrics import EVALUATE_METRIC_DIR, load_evaluate_metric

    features, labels = clustered_data(90, 5, 12, seed=11)
    classifier = torch.randn(5, 12, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    halves = [(features[:37].numpy(), labels[:37].numpy()), (features[37:].numpy(), labels[37:].numpy())]
    statistics = CollapseStatistics(5, 12)
    for x, y in halves:
        statistics.update(x, y)
    accuracy = NearestClassMeanAccuracy(statistics.class_means())
    for x, y in halves:
        accuracy.update(x, y)
    expected = {**statistics.compute(classifier), "ncc_accuracy": accuracy.compute()}
    for metric in (evaluate.load(str(EVALUATE_METRIC_DIR)), load_evaluate_metric()):
        for x, y in halves:
            metric.add_batch(features=x, labels=y)
        assert_same_measures(metric.compute(num_classes=5, classifier=classifier.numpy()), expected)
    metric.add_batch(features=features[:4].tolist(), labels=[0, 1, 2, 3])  # class 4 absent
    with pytest.raises(ValueError, match=r"classes \[4\] have no samples"):
        metric.compute(num_classes=5)
