"""Evaluation refuses batches with non-finite pixels or logits, naming batch and image.

argmax over NaN logits is index 0: a model whose outputs are NaN scores 100% on a task whose
images are all class 0. Such a number must never be reported.
"""

import pytest
import torch
import torch.nn as nn

import velcro
from velcro.errors import VelcroError


class Logits(nn.Module):
    """The logits are the input: the test chooses them."""

    def forward(self, x):
        return x


class Log(nn.Module):
    """log of the input: a negative input gives a NaN logit from finite pixels."""

    def forward(self, x):
        return x.log()


def data(batches=4, size=3, classes=5):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batches * size, classes, generator=gen) + 0.5
    labels = torch.zeros(batches * size, dtype=torch.long)  # every image is class 0
    return [(x[i : i + size].clone(), labels[i : i + size]) for i in range(0, len(x), size)]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_pixel_names_the_batch_and_the_image(value):
    batches = data()
    batches[2][0][1, 3] = value
    with pytest.raises(VelcroError) as info:
        velcro.evaluate(Logits(), batches, progress=False)
    message = str(info.value)
    assert "\n" not in message
    assert "batch 2, image 1 of the batch (image 7 of the data)" in message
    assert "pixel" in message


def test_non_finite_logits_from_finite_pixels_name_the_batch_and_the_image():
    batches = data()
    batches[1][0][2, 0] = -1.0  # log(-1) = NaN: logits of batch 1, image 2
    with pytest.raises(VelcroError) as info:
        velcro.evaluate(Log(), batches, progress=False)
    message = str(info.value)
    assert "batch 1, image 2 of the batch (image 5 of the data)" in message
    assert "outputs" in message and "\n" not in message


def test_nan_logits_would_otherwise_score_every_class_0_image_right():
    """Why the check exists: argmax of NaN rows is 0, the label of every image here."""
    nan_rows = torch.full((3, 5), float("nan"))
    assert nan_rows.argmax(1).tolist() == [0, 0, 0]
    with pytest.raises(VelcroError, match="batch 0, image 0"):
        velcro.evaluate(Logits(), [(nan_rows, torch.zeros(3, dtype=torch.long))],
                        progress=False)


def test_finite_batches_evaluate_as_before():
    report = velcro.evaluate(Log(), data(), progress=False)
    logits = torch.cat([x for x, _ in data()]).log()
    assert report.correct == int((logits.argmax(1) == 0).sum())
