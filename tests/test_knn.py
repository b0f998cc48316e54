"""Weighted kNN evaluation (DINO eval_knn protocol): classification, feature extraction, reporting."""

from __future__ import annotations

import json
import math
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from selfdistill.data.sampler import ShardedEvalSampler
from selfdistill.eval.inference import extract_features
from selfdistill.eval.knn import (
    format_knn_results,
    knn_classify,
    save_knn_results,
    weighted_vote,
)


def _circle(angles: list[float]) -> torch.Tensor:
    """Unit vectors in 2-D at the given angles (radians): cosine similarity = cos(angle gap)."""
    a = torch.tensor(angles, dtype=torch.float32)
    return torch.stack([a.cos(), a.sin()], dim=1)


def _clusters(centres: torch.Tensor, n_per_class: int, seed: int):
    """Normalised points scattered tightly (sigma 0.05) around each centre."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(centres)).repeat_interleave(n_per_class)
    feats = centres[labels] + 0.05 * torch.randn(len(labels), centres.shape[1], generator=g)
    return F.normalize(feats, dim=1), labels


def _random_problem(n_train=150, n_test=60, dim=16, num_classes=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    train = F.normalize(torch.randn(n_train, dim, generator=g), dim=1)
    test = F.normalize(torch.randn(n_test, dim, generator=g), dim=1)
    train_labels = torch.randint(0, num_classes, (n_train,), generator=g)
    test_labels = torch.randint(0, num_classes, (n_test,), generator=g)
    return train, train_labels, test, test_labels


def _brute_force_knn(train, train_labels, test, test_labels, k, temperature):
    """Plain-loop reference: float64 dot products, sum of exp(sim / T) per class, rank by score.

    Only classes that received a vote are ranked (ties go to the lower class index).
    """
    train, test = train.double().tolist(), test.double().tolist()
    top1 = top5 = 0
    for query, target in zip(test, test_labels.tolist()):
        sims = [sum(a * b for a, b in zip(query, row)) for row in train]
        nearest = sorted(range(len(train)), key=lambda j: -sims[j])[:k]
        scores: dict[int, float] = {}
        for j in nearest:
            c = int(train_labels[j])
            scores[c] = scores.get(c, 0.0) + math.exp(sims[j] / temperature)
        ranking = sorted(scores, key=lambda c: (-scores[c], c))
        top1 += ranking[0] == target
        top5 += target in ranking[:5]
    n = len(test)
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n}


# --------------------------------------------------------------------------------------------
# knn_classify
# --------------------------------------------------------------------------------------------


def test_separated_clusters_are_perfect():
    centres = torch.eye(8)[:3]  # orthogonal: similarity 0 between clusters, ~1 within
    train, train_labels = _clusters(centres, 20, seed=0)
    test, test_labels = _clusters(centres, 1, seed=1)  # 3 test images: fewer than the reference needs

    results = knn_classify(train, train_labels, test, test_labels, k_values=(1, 5, 10))
    assert results == {1: {"top1": 100.0}, 5: {"top1": 100.0}, 10: {"top1": 100.0}}  # 3 classes: no top5

    results = knn_classify(train, train_labels, test, test_labels, k_values=(10,), num_classes=10)
    assert results == {10: {"top1": 100.0, "top5": 100.0}}


def test_weighted_vote_beats_majority_when_temperature_is_small():
    # Query at angle 0. Class 0 has one very close neighbour (0.1 rad), class 1 two far ones
    # (0.6, 0.7 rad), class 2 sits opposite and is never among the 3 nearest.
    train = _circle([0.1, 0.6, 0.7, math.pi])
    train_labels = torch.tensor([0, 1, 1, 2])
    test, test_labels = _circle([0.0]), torch.tensor([0])
    # cos: 0.9950, 0.8253, 0.7648.
    # T = 0.05: class 0 = e^19.90; class 1 = e^16.51 + e^15.30 = e^19.90 * (0.034 + 0.010) -> class 0.
    # T = 1:    class 0 = e^0.995 = 2.70; class 1 = e^0.825 + e^0.765 = 2.28 + 2.15 = 4.43 -> class 1,
    #           which is also the unweighted majority (2 votes against 1).
    sharp = knn_classify(train, train_labels, test, test_labels, k_values=(3,), temperature=0.05)
    flat = knn_classify(train, train_labels, test, test_labels, k_values=(3,), temperature=1.0)
    assert sharp[3]["top1"] == 100.0
    assert flat[3]["top1"] == 0.0
    # k=1 only sees the class-0 neighbour whatever the temperature
    nearest_only = knn_classify(train, train_labels, test, test_labels, k_values=(1,), temperature=1.0)
    assert nearest_only[1]["top1"] == 100.0


def test_class_scores_match_hand_computation():
    sims = torch.tensor([[0.9, 0.5, 0.3]])
    labels = torch.tensor([[0, 1, 1]])
    temperature = 0.1
    scores = weighted_vote(sims, labels, num_classes=3, temperature=temperature)
    # Scores are relative to the nearest neighbour's weight exp(0.9 / T).
    dino_scores = scores[0, :2].double() * math.exp(0.9 / temperature)
    expected = torch.tensor([math.exp(9.0), math.exp(5.0) + math.exp(3.0)], dtype=torch.float64)
    torch.testing.assert_close(dino_scores, expected, rtol=1e-5, atol=0)
    assert scores[0, 2] == -math.inf  # no neighbour of class 2: never predicted


def test_weighted_vote_does_not_overflow_at_tiny_temperature():
    sims = torch.tensor([[1.0, 0.99, -1.0]])
    scores = weighted_vote(sims, torch.tensor([[2, 0, 1]]), num_classes=3, temperature=1e-4)
    assert torch.isfinite(scores).all()
    assert scores.argmax().item() == 2


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_brute_force_reference(seed):
    train, train_labels, test, test_labels = _random_problem(seed=seed)
    k_values = (1, 3, 10, 50, 150)
    results = knn_classify(train, train_labels, test, test_labels, k_values=k_values, temperature=0.07)
    for k in k_values:
        assert results[k] == _brute_force_knn(train, train_labels, test, test_labels, k, 0.07), k


def test_chunking_changes_nothing():
    train, train_labels, test, test_labels = _random_problem(n_train=200, n_test=53, seed=3)
    runs = [
        knn_classify(train, train_labels, test, test_labels, k_values=(1, 5, 20, 100), chunk_size=c)
        for c in (1, 7, 10000)
    ]
    assert runs[0] == runs[1] == runs[2]


def test_k_larger_than_train_set_is_clipped_with_one_warning():
    train, train_labels, test, test_labels = _random_problem(n_train=5, n_test=20, seed=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = knn_classify(train, train_labels, test, test_labels, k_values=(3, 10, 20))
    clip_warnings = [w for w in caught if "exceed" in str(w.message)]
    assert len(clip_warnings) == 1
    assert "[10, 20]" in str(clip_warnings[0].message)
    full = knn_classify(train, train_labels, test, test_labels, k_values=(5,))[5]
    assert results[10] == results[20] == full
    assert set(results) == {3, 10, 20}


def test_labels_above_num_classes_and_default_num_classes():
    train, train_labels, test, test_labels = _random_problem(num_classes=4, seed=5)
    test_labels[0] = 6  # a test class absent from the bank still counts towards num_classes
    assert "top5" in knn_classify(train, train_labels, test, test_labels, k_values=(10,))[10]
    with pytest.raises(ValueError, match="num_classes"):
        knn_classify(train, train_labels, test, test_labels, num_classes=5)


def _bad_inputs():
    train, train_labels, test, test_labels = _random_problem(n_train=10, n_test=4, dim=3, seed=6)
    ok = dict(train_features=train, train_labels=train_labels, test_features=test, test_labels=test_labels)
    return [
        ("dim", {**ok, "test_features": torch.randn(4, 5)}, "feature dimensions differ"),
        ("train_len", {**ok, "train_labels": train_labels[:-1]}, "train_labels has 9 entries"),
        ("test_len", {**ok, "test_labels": test_labels[:2]}, "test_labels has 2 entries"),
        ("empty_train", {**ok, "train_features": train[:0], "train_labels": train_labels[:0]}, "empty"),
        ("empty_test", {**ok, "test_features": test[:0], "test_labels": test_labels[:0]}, "empty"),
        ("unlabelled_train", {**ok, "train_labels": torch.full((10,), -1)}, "unlabelled"),
        ("unlabelled_test", {**ok, "test_labels": torch.tensor([0, -1, 1, 2])}, "unlabelled"),
        ("1d_features", {**ok, "test_features": test[0]}, "2-D"),
        ("float_labels", {**ok, "test_labels": test_labels.float()}, "integer"),
        ("nan", {**ok, "train_features": torch.full((10, 3), float("nan"))}, "NaN"),
        ("k_zero", {**ok, "k_values": (0,)}, "positive integers"),
        ("k_empty", {**ok, "k_values": ()}, "must not be empty"),
        ("temperature", {**ok, "temperature": 0.0}, "temperature"),
        ("chunk", {**ok, "chunk_size": 0}, "chunk_size"),
    ]


@pytest.mark.parametrize("name,kwargs,message", _bad_inputs(), ids=[c[0] for c in _bad_inputs()])
def test_bad_input_raises(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        knn_classify(**kwargs)


# --------------------------------------------------------------------------------------------
# Feature extraction
# --------------------------------------------------------------------------------------------


class _DictDataset(Dataset):
    def __init__(self, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, 4, 4, generator=g)
        self.labels = torch.arange(n) % 3

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i], "index": torch.tensor(i)}


def _feature_fn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 5))


def test_extract_features_normalised_and_in_dataset_order():
    dataset = _DictDataset(10)
    fn = _feature_fn()
    loader = DataLoader(dataset, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(1))
    feats, labels, indices = extract_features(fn, loader, show_progress=False)

    assert feats.dtype == torch.float32 and feats.shape == (10, 5)
    assert labels.dtype == indices.dtype == torch.int64
    assert indices.tolist() == list(range(10))
    assert torch.equal(labels, dataset.labels)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(10))
    with torch.no_grad():
        expected = F.normalize(fn(dataset.images), dim=1)
    torch.testing.assert_close(feats, expected)
    # no_grad, not inference_mode: the outputs are ordinary tensors, the module can keep training
    assert not feats.requires_grad and not feats.is_inference()

    raw, _, _ = extract_features(fn, loader, normalize=False, show_progress=False)
    torch.testing.assert_close(F.normalize(raw, dim=1), feats)


def test_extract_features_drops_repeated_indices():
    dataset = _DictDataset(5)
    padded = list(range(5)) + [0, 1]  # what DistributedSampler / even_batches padding produces
    loader = DataLoader(dataset, batch_size=2, sampler=padded)
    feats, labels, indices = extract_features(_feature_fn(), loader, show_progress=False)
    assert indices.tolist() == list(range(5)) and feats.shape[0] == labels.shape[0] == 5


def test_extract_features_rejects_bad_batches():
    class TupleDataset(_DictDataset):
        def __getitem__(self, i):
            return self.images[i], self.labels[i]

    with pytest.raises(ValueError, match="'image', 'label' and 'index'"):
        extract_features(_feature_fn(), DataLoader(TupleDataset(4), batch_size=2), show_progress=False)
    with pytest.raises(ValueError, match="no samples"):
        extract_features(_feature_fn(), [], show_progress=False)


def test_sharded_sampler_covers_each_index_once():
    shards = [list(ShardedEvalSampler(10, rank=r, world_size=4)) for r in range(4)]
    assert sorted(i for shard in shards for i in shard) == list(range(10))
    assert [len(ShardedEvalSampler(10, rank=r, world_size=4)) for r in range(4)] == [3, 3, 2, 2]
    assert list(ShardedEvalSampler(7)) == list(range(7))
    with pytest.raises(ValueError, match="rank"):
        ShardedEvalSampler(10, rank=4, world_size=4)


class _ThreadGroup:
    """Collectives between threads standing in for processes."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size, timeout=10)
        self.slots: list = [None] * world_size

    def all_gather(self, rank: int, value):
        self.slots[rank] = value
        self.barrier.wait()
        values = list(self.slots)
        self.barrier.wait()
        return values


class _FakeAccelerator:
    """The slice of ``accelerate.Accelerator`` used by ``extract_features``, one per thread."""

    def __init__(self, group: _ThreadGroup, rank: int):
        self.group, self.process_index = group, rank
        self.num_processes = group.world_size
        self.is_main_process = rank == 0
        self.device = torch.device("cpu")

    def gather(self, tensor):
        return torch.cat(self.group.all_gather(self.process_index, tensor), dim=0)

    def pad_across_processes(self, tensor, dim=0, pad_index=0, pad_first=False):
        longest = max(self.group.all_gather(self.process_index, tensor.shape[dim]))
        padded = tensor.new_full((longest, *tensor.shape[1:]), pad_index)
        padded[: tensor.shape[0]] = tensor
        return padded


@pytest.mark.parametrize("dataset_len,world_size", [(10, 3), (2, 4)])
def test_extract_features_gathers_unequal_shards(dataset_len, world_size):
    dataset, fn = _DictDataset(dataset_len), _feature_fn()
    reference = extract_features(fn, DataLoader(dataset, batch_size=2), show_progress=False)
    group = _ThreadGroup(world_size)
    outputs: list = [None] * world_size

    def run(rank):
        loader = DataLoader(dataset, batch_size=2, sampler=ShardedEvalSampler(dataset_len, rank, world_size))
        accelerator = _FakeAccelerator(group, rank)
        outputs[rank] = extract_features(fn, loader, accelerator=accelerator, show_progress=False)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    for out in outputs:  # every rank: the full set, in dataset order, identical to one process
        assert out is not None
        for got, want in zip(out, reference):
            torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def test_format_knn_results():
    text = format_knn_results({10: {"top1": 71.234, "top5": 90.5}, 200: {"top1": 5.0}})
    lines = text.splitlines()
    assert len(lines) == 3 and lines[0].split() == ["k", "top1", "top5"]
    assert lines[1].split() == ["10", "71.23", "90.50"]
    assert lines[2].split() == ["200", "5.00", "-"]
    assert len({len(line) for line in lines}) == 1  # aligned


def test_save_knn_results_writes_json_atomically(tmp_path):
    results = {10: {"top1": 70.0, "top5": 90.0}, 20: {"top1": 71.0, "top5": 91.0}}
    path = tmp_path / "sub" / "knn.json"
    save_knn_results(
        results, path, extra={"epoch": 3}, temperature=0.07, feature="teacher CLS", n_train=100, n_test=40
    )
    data = json.loads(path.read_text())
    assert data["protocol"] == {
        "method": "weighted kNN (DINO eval_knn)",
        "temperature": 0.07,
        "k": [10, 20],
        "feature": "teacher CLS",
        "n_train": 100,
        "n_test": 40,
    }
    assert data["results"] == {"10": {"top1": 70.0, "top5": 90.0}, "20": {"top1": 71.0, "top5": 91.0}}
    assert data["epoch"] == 3
    assert [p.name for p in path.parent.iterdir()] == ["knn.json"]  # no temp file left behind

    with pytest.raises(ValueError, match="protocol"):
        save_knn_results(results, path, extra={"protocol": {}})


def test_atomic_json_write_keeps_the_old_file_on_failure(tmp_path):
    from selfdistill.atomic import write_json_atomic

    path = write_json_atomic(tmp_path / "r.json", {"top1": 1.0})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"top1": object()})  # not JSON: fails before anything is replaced
    assert json.loads(path.read_text()) == {"top1": 1.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temp file left behind
    assert path.stat().st_mode & 0o777 == 0o644
