"""The bundled digits: upscaling, normalisation, stratified seeded splits, task selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from velcro import VelcroError
from velcro.data import digits


@pytest.fixture(scope="module")
def raw():
    bunch = load_digits()
    return bunch.images.astype(np.float64), bunch.target.astype(np.int64)


@pytest.fixture(scope="module")
def split():
    return digits.load(seed=0)


def bilinear_upscale(image: np.ndarray, size: int) -> np.ndarray:
    """Half-pixel-centre bilinear interpolation, written out in NumPy."""
    n = image.shape[0]
    source = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
    low = np.floor(source).astype(int)
    high = np.minimum(low + 1, n - 1)
    weight = source - low
    rows = image[low] * (1 - weight)[:, None] + image[high] * weight[:, None]
    return rows[:, low] * (1 - weight)[None, :] + rows[:, high] * weight[None, :]


def test_images_are_upscaled_replicated_and_normalised(raw, split):
    images, labels = raw
    for dataset, index in ((split.train, split.train_index), (split.test, split.test_index)):
        tensor_images, tensor_labels = dataset.tensors
        assert tensor_images.shape[1:] == (3, 32, 32) and tensor_images.dtype == torch.float32
        assert np.array_equal(tensor_labels.numpy(), labels[index.numpy()])
        for position in (0, len(index) // 2, len(index) - 1):
            expected = (bilinear_upscale(images[int(index[position])] / 16, 32)
                        - digits.MEAN) / digits.STD
            for channel in range(3):
                np.testing.assert_allclose(tensor_images[position, channel].numpy(), expected,
                                           atol=1e-5)
    everything = torch.cat([split.train.tensors[0], split.test.tensors[0]])
    assert abs(float(everything.mean())) < 0.01
    assert abs(float(everything.std()) - 1) < 0.01


def test_split_is_stratified_disjoint_and_complete(raw, split):
    _, labels = raw
    train, test = split.train_index.numpy(), split.test_index.numpy()
    assert len(np.intersect1d(train, test)) == 0
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(len(labels)))
    per_digit = np.bincount(labels, minlength=10)
    held_out = np.bincount(labels[test], minlength=10)
    assert np.array_equal(held_out, np.round(0.3 * per_digit).astype(int))


def test_split_is_reproducible_and_seeded(split):
    again = digits.load(seed=0)
    other = digits.load(seed=1)
    assert torch.equal(again.test_index, split.test_index)
    assert torch.equal(again.test.tensors[0], split.test.tensors[0])
    assert not torch.equal(other.test_index, split.test_index)


def test_split_stratified_fractions():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 1)
    first, second = digits.split_stratified(labels, 0.2, seed=3)
    assert [int((labels[second] == d).sum()) for d in range(3)] == [2, 1, 0]
    assert sorted(first.tolist() + second.tolist()) == list(range(16))
    with pytest.raises(VelcroError, match="fraction"):
        digits.split_stratified(labels, 1.5, seed=0)


def test_select_keeps_original_labels(split):
    task = digits.select(split.test, (8, 3))
    images, labels = task.tensors
    all_labels = split.test.tensors[1]
    assert set(labels.tolist()) == {3, 8}
    assert len(labels) == int(((all_labels == 3) | (all_labels == 8)).sum())
    first_eight = int(torch.nonzero(all_labels == 8)[0])
    assert torch.equal(images[labels == 8][0], split.test.tensors[0][first_eight])


@pytest.mark.parametrize("text, expected", [("3,8", (3, 8)), (" 9, 4,7 ,4", (4, 7, 9)),
                                            ((8, 3), (3, 8))])
def test_parse_task(text, expected):
    assert digits.parse_task(text) == expected


@pytest.mark.parametrize("text", ["", "3,x", "10", "-1,2"])
def test_parse_task_rejects_bad_digits(text):
    with pytest.raises(VelcroError, match="task"):
        digits.parse_task(text)
