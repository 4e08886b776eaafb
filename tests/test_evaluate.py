import pytest
import torch
import torch.nn as nn

import velcro
from velcro.errors import VelcroError
from velcro.evaluate import wilson_interval


class Logits(nn.Module):
    """Returns its input: the test chooses the logits."""

    def forward(self, x):
        return x


def batches(logits, labels, size=3):
    return [(logits[i : i + size], labels[i : i + size]) for i in range(0, len(labels), size)]


def test_top1_task_top1_and_per_class_by_hand():
    # 6 classes, task = {1, 4}; columns chosen so that full and restricted argmax differ
    logits = torch.tensor([
        [0, 9, 0, 0, 1, 0],  # label 1: right both ways
        [9, 2, 0, 0, 1, 0],  # label 1: wrong overall (0), right within task (1 > 4)
        [0, 1, 0, 9, 2, 0],  # label 4: wrong overall (3), right within task
        [0, 3, 0, 0, 2, 0],  # label 4: wrong both ways
        [0, 0, 0, 0, 5, 0],  # label 4: right both ways
    ], dtype=torch.float32)
    labels = torch.tensor([1, 1, 4, 4, 4])
    report = velcro.evaluate(Logits(), batches(logits, labels), task_classes=[1, 4],
                             progress=False)
    assert report.images == 5 and report.correct == 2
    assert report.accuracy == pytest.approx(2 / 5)
    assert report.task_accuracy == pytest.approx(4 / 5)
    assert report.per_class() == {
        1: {"images": 2, "correct": 1, "accuracy": 0.5},
        4: {"images": 3, "correct": 1, "accuracy": 1 / 3},
    }
    summary = report.to_dict()
    assert summary["task_classes"] == [1, 4] and summary["images"] == 5


def test_wilson_interval_textbook_value():
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)


def test_paired_difference_by_hand():
    labels = torch.zeros(8, dtype=torch.long)
    right, wrong = [5.0, 0.0], [0.0, 5.0]
    base = torch.tensor([right, right, right, wrong, wrong, right, wrong, right])
    new = torch.tensor([right, right, wrong, right, right, right, wrong, right])
    a = velcro.evaluate(Logits(), batches(base, labels), progress=False)
    b = velcro.evaluate(Logits(), batches(new, labels), progress=False)
    paired = b.paired_difference(a)
    d = torch.tensor([0, 0, -1, 1, 1, 0, 0, 0], dtype=torch.float64)
    half = 1.959963984540054 * float(d.std()) / 8 ** 0.5
    assert paired["difference"] == pytest.approx(1 / 8)
    assert paired["gained"] == 2 and paired["lost"] == 1
    assert paired["ci95"] == pytest.approx([1 / 8 - half, 1 / 8 + half])


def test_unlabelled_data_and_bad_task_are_clear_errors():
    with pytest.raises(VelcroError, match="labels"):
        velcro.evaluate(Logits(), [torch.zeros(2, 3)], progress=False)
    with pytest.raises(VelcroError, match="out of range"):
        velcro.evaluate(Logits(), [(torch.zeros(2, 3), torch.zeros(2))], task_classes=[7],
                        progress=False)
