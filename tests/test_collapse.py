"""`collapse_report`: per-block features pooled as each architecture's head reads them, both streaming
passes, distributed reduction, the effective-depth rule, and the plot.

References are computed independently of `etf_hf.collapse`: features are gathered by hand from
``output_hidden_states`` (pooling written out per example) and measured in one go with `measure_collapse`.
"""
from __future__ import annotations

import threading

import pytest
import torch

from etf_hf import collapse_report, plot_collapse
from etf_hf.collapse import effective_depth, pool
from etf_hf.metrics import measure_collapse
from adaptive_ddp_worker import CLASSES, SeparableImages, tiny_mlp
from tiny_models import tiny_bert, tiny_gpt2



def reference_rows(per_block_features: list[list[torch.Tensor]], labels: list[torch.Tensor], classes: int):
    """measure_collapse over the gathered features of each block (the unstreamed definition)."""
    return [measure_collapse(list(zip(block, labels)), classes, block[0].shape[-1]) for block in per_block_features]


def assert_rows_match(report, expected):
    assert len(report.rows) == len(expected)
    for index, (row, reference) in enumerate(zip(report.rows, expected)):
        assert row["layer"] == index
        assert row["ncc"] == reference["ncc_accuracy"]
        for key in ("nc1", "etf_error", "nc2_equinorm", "cdnv"):
            assert row[key] == pytest.approx(reference[key], rel=1e-9, abs=1e-12), (index, key)


def test_effective_depth_is_the_start_of_the_final_run_above_threshold():
    assert effective_depth([0.2, 0.95, 0.5, 0.91, 0.99], 0.9) == 3
    assert effective_depth([0.95, 0.96, 0.97], 0.9) == 0
    assert effective_depth([0.95, 0.96, 0.5], 0.9) is None
    assert effective_depth([0.95, float("nan"), 0.97], 0.9) == 2
    assert effective_depth([], 0.9) is None


def test_effective_depth_counts_a_tie_only_when_not_strict():
    """Reports and layers="auto" count NCC equal to the threshold; Adaptive-ETF's lock rule (strict) does not."""
    assert effective_depth([0.5, 0.9, 0.95], 0.9) == 1
    assert effective_depth([0.5, 0.9, 0.95], 0.9, strict=True) == 2
    assert effective_depth([0.5, 0.95, 0.9], 0.9, strict=True) is None


def test_pooling_finds_the_last_real_token_on_either_padding_side():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    assert torch.equal(pool(hidden, "last", right), torch.stack([hidden[0, 1], hidden[1, 3]]))
    assert torch.equal(pool(hidden, "last", left), torch.stack([hidden[0, 3], hidden[1, 3]]))
    assert torch.equal(pool(hidden, "mean", right), torch.stack([hidden[0, :2].mean(0), hidden[1].mean(0)]))
    assert torch.equal(pool(hidden, "cls", right), hidden[:, 0])
    assert pool(hidden, "flat").shape == (2, 12)
    assert torch.equal(pool(hidden[:, 0], "last", right), hidden[:, 0])  # already (batch, dim): used as is


def test_mlp_report_matches_unstreamed_measures_and_restores_train_mode():
    model = tiny_mlp()
    data = SeparableImages(96, seed=1)
    model.train()
    report = collapse_report(model, data, batch_size=40)  # 3 uneven batches; num_classes from the config
    assert model.training, "collapse_report must put the model back in training mode"
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    blocks: list[list[torch.Tensor]] = [[] for _ in range(3)]
    labels = []
    with torch.no_grad():
        for start in range(0, 96, 40):
            batch = data.pixels[start:start + 40]
            states = model(pixel_values=batch, output_hidden_states=True).hidden_states
            for block, features in zip(blocks, states[1:]):
                block.append(features)
            labels.append(data.labels[start:start + 40])
    assert_rows_match(report, reference_rows(blocks, labels, CLASSES))
    assert report.threshold == 0.9 and report.effective_depth == effective_depth(report.ncc, 0.9)


def test_gpt2_uses_last_non_pad_token_and_bert_the_cls_token():
    generator = torch.Generator().manual_seed(5)
    batches, labels = [], []
    for _ in range(3):
        input_ids = torch.randint(1, 96, (8, 10), generator=generator)
        lengths = torch.randint(3, 11, (8,), generator=generator)
        mask = (torch.arange(10) < lengths[:, None]).long()
        label = torch.randint(0, 3, (8,), generator=generator)
        batches.append({"input_ids": input_ids, "attention_mask": mask, "labels": label})
        labels.append(label)

    gpt2 = tiny_gpt2().eval()
    report = collapse_report(gpt2, batches, num_classes=3)
    blocks: list[list[torch.Tensor]] = [[] for _ in range(2)]
    with torch.no_grad():
        for batch in batches:
            states = gpt2(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          output_hidden_states=True).hidden_states
            last = batch["attention_mask"].sum(1) - 1
            for block, features in zip(blocks, states[1:]):
                block.append(torch.stack([features[i, last[i]] for i in range(8)]))
    assert_rows_match(report, reference_rows(blocks, labels, 3))

    bert = tiny_bert(num_labels=3).eval()
    bert_batches = [{**b, "input_ids": b["input_ids"] % 120} for b in batches]
    report = collapse_report(bert, bert_batches)
    blocks = [[] for _ in range(2)]
    with torch.no_grad():
        for batch in bert_batches:
            states = bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          output_hidden_states=True).hidden_states
            for block, features in zip(blocks, states[1:]):
                block.append(features[:, 0])
    assert_rows_match(report, reference_rows(blocks, labels, 3))


class TwoRankSum:
    """An in-process stand-in for all_reduce(SUM) between two threads, called in the same order by both."""

    def __init__(self) -> None:
        self.barrier = threading.Barrier(2, timeout=60)
        self.slots: list[torch.Tensor | None] = [None, None]

    def for_rank(self, rank: int):
        def all_reduce(tensor: torch.Tensor) -> None:
            self.slots[rank] = tensor.clone()
            self.barrier.wait()
            total = self.slots[0] + self.slots[1]
            self.barrier.wait()
            tensor.copy_(total)
        return all_reduce


def test_sharded_reports_with_reduction_equal_the_whole_data_report():
    model = tiny_mlp().eval()
    data = SeparableImages(80, seed=2)
    whole = collapse_report(model, data, batch_size=16)
    shards = [torch.utils.data.Subset(data, range(rank, 80, 2)) for rank in (0, 1)]
    summer = TwoRankSum()
    results: list = [None, None]

    def run(rank: int) -> None:
        results[rank] = collapse_report(model, shards[rank], batch_size=16, reduce_fn=summer.for_rank(rank))

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for result in results:
        assert result is not None
        assert result.ncc == whole.ncc
        for row, reference in zip(result.rows, whole.rows):
            assert row["nc1"] == pytest.approx(reference["nc1"], rel=1e-9)
            assert row["etf_error"] == pytest.approx(reference["etf_error"], rel=1e-9, abs=1e-12)


def test_rejects_unknown_pooling_and_missing_labels():
    model = tiny_mlp()
    with pytest.raises(ValueError, match="pooling"):
        collapse_report(model, SeparableImages(8, seed=0), pooling="max")
    with pytest.raises(ValueError, match="'labels'"):
        collapse_report(model, [{"pixel_values": torch.randn(4, 784)}])


def test_plot_collapse_writes_a_png_and_leaves_matplotlib_as_it_was(tmp_path, monkeypatch):
    import matplotlib

    monkeypatch.setitem(matplotlib.rcParams, "backend", "svg")  # a user's own choice, which must survive
    pyplot_figures = len(__import__("matplotlib.pyplot").pyplot.get_fignums())
    report = collapse_report(tiny_mlp(), SeparableImages(40, seed=3), threshold=0.5)
    path = plot_collapse(report, tmp_path / "plots" / "collapse.png", title="tiny MLP")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
    assert matplotlib.get_backend() == "svg"
    assert len(__import__("matplotlib.pyplot").pyplot.get_fignums()) == pyplot_figures
