"""What the search keeps: fidelity or accuracy criteria, and the confidence bound that guards them.

A candidate plan is compared with the uncompressed model *on the same images* (paired), and
its **loss** under the chosen criterion is:

- ``agreement``: the share of images whose top-1 class differs from the uncompressed model's
  (needs no labels). The accuracy lost can never exceed it: an image can only change from
  right to wrong if its prediction changed, so bounding disagreement by ``t`` bounds the
  top-1 loss by ``t`` on any images, labelled or not.
- ``kl``: the mean KL divergence KL(p_original || p_compressed) of the softmax, in nats
  (needs no labels): a smooth measure of how far the outputs moved.
- ``accuracy``: top-1 of the uncompressed model minus top-1 of the compressed one (needs
  labels): what the papers keep.

**The guard.** With ``confidence`` set, a candidate is accepted only when a one-sided upper
confidence bound on its loss is at most ``tolerance``; with ``confidence=None`` the point
estimate is compared (the search before issue 14). The bounds, at confidence ``c``:

- ``agreement``: each image either changed its prediction or not, independently of the
  others, so the number changed is binomial; the bound is the exact one-sided
  Clopper-Pearson upper limit of that proportion (never below the nominal coverage).
- ``accuracy``: the per-image differences are paired (the same images under both models), so
  the loss is (lost - gained) / n where *lost* and *gained* are the discordant pairs of the
  2x2 table. The bound is Newcombe's hybrid-score interval for a difference of paired
  proportions (Newcombe 1998, Stat. Med. 17:2635, method 10), one-sided: Wilson limits of
  both accuracies combined with the table's phi correlation. Unlike the Wald interval it
  is not degenerate at few discordant pairs (zero changes do not prove zero loss), and its
  coverage is close to nominal across the table's range (Newcombe's evaluation; checked by
  simulation in the tests). An exact alternative (Clopper-Pearson on *lost* minus a lower
  limit on *gained*, Bonferroni-split) is valid but about 1.6x wider.
- ``kl``: a one-sided normal (central-limit) bound on the mean per-image KL:
  mean + z_c * sd / sqrt(n). Approximate: per-image KL is skewed, so with few images the
  coverage can fall short; use ``agreement`` where a guarantee matters.

**Multiplicity.** The search evaluates many candidates (often over a hundred) on the same
search images and keeps the one that saves most among those that pass. The guard inside the
search is therefore *not* a confidence statement about the winner: it demands evidence from
every candidate (so that a plan which changed many predictions cannot pass on a lucky count)
and it is not corrected for the number of candidates. The statement at the stated
confidence is made by the nested check (``_check``): a fixed sequence of candidates, ordered
using the search images only, is tested on images the search never saw.

Example:
    >>> guard = Guard("agreement", tolerance=0.02, confidence=0.9)
    >>> guard.bound(Tally(images=500, changed=3)) <= 0.02
    True
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import torch
import torch.nn.functional as F

from velcro.errors import VelcroError, VelcroWarning

CRITERIA = ("agreement", "kl", "accuracy")
UNITS = {"agreement": "of top-1 predictions changed", "kl": "nats of mean KL divergence",
         "accuracy": "of top-1 accuracy"}


@dataclass(frozen=True)
class Tally:
    """A candidate's paired counts against the uncompressed model on the same images.

    Attributes:
        images: images compared.
        changed: images whose top-1 differs from the uncompressed model's.
        kl_sum, kl_square_sum: sum of per-image KL(p_original || p_candidate) and of its square.
        baseline_correct, correct: top-1 hits of the uncompressed model and of the candidate
            (None without labels).
        lost, gained: images the uncompressed model got right and the candidate wrong, and the
            reverse (None without labels).
    """

    images: int
    changed: int = 0
    kl_sum: float = 0.0
    kl_square_sum: float = 0.0
    baseline_correct: int | None = None
    correct: int | None = None
    lost: int | None = None
    gained: int | None = None


def compare_outputs(original: torch.Tensor, candidate: torch.Tensor,
                    labels: torch.Tensor | None = None,
                    task_classes: torch.Tensor | None = None) -> Tally:
    """The paired counts of ``candidate`` logits against ``original`` ones on the same images.

    Args:
        original, candidate: ``(images, classes)`` logits of the uncompressed and the
            compressed model.
        labels: the images' class indices, or None.
        task_classes: restrict the argmax and the softmax to these class indices.

    Example:
        >>> tally = compare_outputs(model(x), compressed(x), y)
        >>> Guard("agreement", 0.02, 0.9).passes(tally)
        True
    """
    if original.shape != candidate.shape or original.dim() != 2:
        raise VelcroError(f"outputs of shapes {tuple(original.shape)} and "
                          f"{tuple(candidate.shape)} cannot be paired; give (images, classes) "
                          "logits of both models on the same images")
    if task_classes is not None:
        original, candidate = original[:, task_classes], candidate[:, task_classes]
    before, after = original.double().argmax(1), candidate.double().argmax(1)
    log_p = F.log_softmax(original.double(), dim=1)
    log_q = F.log_softmax(candidate.double(), dim=1)
    kl = (log_p.exp() * (log_p - log_q)).sum(1).clamp_min(0.0)
    tally = Tally(int(original.shape[0]), int((before != after).sum()), float(kl.sum()),
                  float(kl.square().sum()))
    if labels is None:
        return tally
    if task_classes is not None:
        before, after = task_classes[before], task_classes[after]
    right_before, right_after = before == labels, after == labels
    return Tally(tally.images, tally.changed, tally.kl_sum, tally.kl_square_sum,
                 int(right_before.sum()), int(right_after.sum()),
                 int((right_before & ~right_after).sum()), int((~right_before & right_after).sum()))


def z_value(confidence: float) -> float:
    """The standard normal quantile at ``confidence`` (one-sided)."""
    return NormalDist().inv_cdf(confidence)


def clopper_pearson_upper(successes: int, total: int, confidence: float) -> float:
    """The exact one-sided upper confidence limit of a binomial proportion.

    The ``p`` at which ``P(Binomial(total, p) <= successes) = 1 - confidence`` (the
    ``confidence`` quantile of Beta(successes + 1, total - successes)), by bisection on the
    binomial distribution function summed in log space.

    Example:
        >>> round(clopper_pearson_upper(0, 100, 0.95), 4)  # the "rule of three": ~3/n
        0.0295
    """
    if total <= 0:
        return 1.0
    if successes >= total:
        return 1.0
    alpha = 1.0 - confidence
    if successes == 0:  # closed form: (1 - p)^n = alpha
        return -math.expm1(math.log(alpha) / total)
    k = np.arange(successes + 1, dtype=np.float64)
    # log C(total, k), built up term by term
    log_choose = np.concatenate(([0.0], np.cumsum(np.log((total - k[1:] + 1) / k[1:]))))
    low, high = successes / total, 1.0
    for _ in range(64):
        middle = 0.5 * (low + high)
        terms = log_choose + k * math.log(middle) + (total - k) * math.log1p(-middle)
        peak = terms.max()
        cdf = math.exp(peak) * float(np.exp(terms - peak).sum())
        if cdf > alpha:
            low = middle
        else:
            high = middle
    return high


def _wilson(successes: int, total: int, z: float) -> tuple[float, float]:
    p = successes / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe_paired_upper(both: int, lost: int, gained: int, neither: int,
                          confidence: float) -> float:
    """One-sided upper limit of (p_before - p_after) for paired proportions (Newcombe's
    method 10).

    Args:
        both: images right before and after; ``lost``: right before, wrong after;
            ``gained``: wrong before, right after; ``neither``: wrong both times.
        confidence: the one-sided confidence.

    Example:
        >>> newcombe_paired_upper(400, 6, 6, 88, 0.9) > 0  # no net loss, still a margin
        True
    """
    n = both + lost + gained + neither
    if n == 0:
        return 1.0
    z = z_value(confidence)
    p1, p2 = (both + lost) / n, (both + gained) / n
    low2, _ = _wilson(both + gained, n, z)
    _, up1 = _wilson(both + lost, n, z)
    margins = ((both + lost) * (gained + neither) * (both + gained) * (lost + neither))
    phi = (both * neither - lost * gained) / math.sqrt(margins) if margins > 0 else 0.0
    a, b = up1 - p1, p2 - low2
    epsilon = math.sqrt(max(0.0, a * a - 2 * phi * a * b + b * b))
    return min(1.0, (p1 - p2) + epsilon)


def mean_upper(total: float, square_total: float, count: int, confidence: float) -> float:
    """One-sided normal upper limit of a mean from its sum and sum of squares."""
    if count <= 0:
        return math.inf
    mean = total / count
    if count == 1:
        return math.inf
    variance = max(0.0, (square_total - count * mean * mean) / (count - 1))
    return mean + z_value(confidence) * math.sqrt(variance / count)


def check_settings(criterion: str, tolerance: float, confidence: float | None) -> None:
    """Refuse unknown criteria and tolerances or confidences out of range (one line each)."""
    if criterion not in CRITERIA:
        raise VelcroError(f"criterion '{criterion}' is unknown; use one of {', '.join(CRITERIA)}")
    top = math.inf if criterion == "kl" else 1.0
    if not (isinstance(tolerance, (int, float)) and 0.0 <= tolerance <= top):
        what = "a KL divergence >= 0 in nats" if criterion == "kl" else "a fraction in [0, 1]"
        raise VelcroError(f"tolerance {tolerance} is out of range for criterion '{criterion}'; "
                          f"give {what}")
    if confidence is not None:
        if not (isinstance(confidence, (int, float)) and 0.5 <= confidence < 1.0):
            raise VelcroError(f"confidence {confidence} is out of range; give a level in "
                              "[0.5, 1) such as 0.9, or None for the point estimate")
        if tolerance == 0:
            raise VelcroError("tolerance 0 with a confidence bound accepts no plan (a bound "
                              "on a loss measured on finite images is above 0); give a "
                              "tolerance above 0 such as 0.02, or confidence None")


@dataclass(frozen=True)
class Guard:
    """Decides whether a candidate's loss is within tolerance (see the module docstring).

    Attributes:
        criterion: ``agreement``, ``kl`` or ``accuracy``.
        tolerance: the loss allowed (a fraction of images for agreement and accuracy,
            nats for kl).
        confidence: the one-sided confidence of the bound, or None for the point estimate.
    """

    criterion: str
    tolerance: float
    confidence: float | None = None

    def __post_init__(self) -> None:
        check_settings(self.criterion, self.tolerance, self.confidence)

    def loss(self, tally: Tally) -> float:
        """The point estimate of the loss."""
        if tally.images == 0:
            return 0.0
        if self.criterion == "agreement":
            return tally.changed / tally.images
        if self.criterion == "kl":
            return tally.kl_sum / tally.images
        if tally.correct is None or tally.baseline_correct is None:
            raise VelcroError("criterion 'accuracy' needs labelled images; give labels or use "
                              "criterion 'agreement'")
        return (tally.baseline_correct - tally.correct) / tally.images

    def bound(self, tally: Tally) -> float:
        """The upper confidence bound of the loss (the point estimate without a confidence)."""
        if self.confidence is None or tally.images == 0:
            return self.loss(tally)
        if self.criterion == "agreement":
            return clopper_pearson_upper(tally.changed, tally.images, self.confidence)
        if self.criterion == "kl":
            return mean_upper(tally.kl_sum, tally.kl_square_sum, tally.images, self.confidence)
        self.loss(tally)  # labels present
        both = tally.correct - tally.gained
        neither = tally.images - both - tally.lost - tally.gained
        return newcombe_paired_upper(both, tally.lost, tally.gained, neither, self.confidence)

    def passes(self, tally: Tally) -> bool:
        """Whether the bound (or the point estimate) is within the tolerance."""
        if tally.images == 0:
            return False
        if self.confidence is None and self.criterion == "accuracy":
            # the search before issue 14, to the image: correct >= baseline - tolerance * n
            return tally.correct >= tally.baseline_correct - self.tolerance * tally.images - 1e-9
        return self.bound(tally) <= self.tolerance + 1e-12

    def resolves(self, images: int) -> bool:
        """Whether ``images`` images can show a loss within the tolerance at all: a plan that
        changes two of their top-1 predictions with no net loss (one image lost, one gained;
        for agreement: one changed) must pass. When it cannot, the guard accepts only plans
        that change nothing there, whatever the tolerance says.

        Example:
            >>> guard = Guard("accuracy", 0.02, 0.8)
            >>> guard.resolves(50), guard.resolves(150)
            (False, True)
        """
        if images < 2:
            return False
        if self.criterion == "kl":
            return True  # a continuous loss: no smallest step
        if self.criterion == "agreement":
            return self.passes(Tally(images, changed=1))
        return self.passes(Tally(images, changed=2, baseline_correct=images - 1,
                                 correct=images - 1, lost=1, gained=1))

    def to_dict(self) -> dict:
        return {"criterion": self.criterion, "tolerance": self.tolerance,
                "confidence": self.confidence}


def warn_unresolved(guard: Guard, parts: list[tuple[str, list]]) -> None:
    """Say when a set of images (``(name, batches)``) is too small for ``guard`` to accept
    anything but plans that change none of their predictions (see :meth:`Guard.resolves`)."""
    for name, batches in parts:
        images = sum(len(x) for x, _ in batches)
        if images and not guard.resolves(images):
            level = ("as a point estimate" if guard.confidence is None
                     else f"at {guard.confidence:g} confidence")
            warnings.warn(
                f"the {images} {name} images cannot resolve a loss within {guard.tolerance:g} "
                f"{level}: a plan that changes two of their "
                "predictions with no net loss already fails, so only plans that change none "
                "pass; give more search images, a larger tolerance, a lower confidence or "
                "confidence None (point estimates)", VelcroWarning, stacklevel=3)
