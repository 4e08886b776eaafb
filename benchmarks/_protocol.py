"""What the quality benchmarks share: paired held-out figures, the issue-14 verdict, and the
baselines a user would pick instead of velcro (Torch-Pruning without fine-tuning).

Not a public module: ``bench_quality.py`` (digits) and ``bench_real.py`` (real networks)
import it from the ``benchmarks`` folder.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from velcro.search._check import fixed_sequence
from velcro.search._criteria import Guard, compare_outputs

Z95 = 1.959963984540054
# issue 14's bar for one run: held-out top-1 change within -0.5 points, or a 95% interval
# that includes 0
JUDGE_LOSS = 0.005


@torch.no_grad()
def logits_of(model: nn.Module, images: torch.Tensor, batch: int = 100) -> torch.Tensor:
    """``model``'s logits on in-memory images, in eval mode (float32, on the CPU)."""
    model.eval()
    return torch.cat([model(images[i : i + batch]).float() for i in range(0, len(images),
                                                                           batch)])


def paired(reference: torch.Tensor, outputs: torch.Tensor, labels: torch.Tensor) -> dict:
    """Held-out figures of ``outputs`` against the uncompressed ``reference`` logits.

    Returns the top-1 change (compressed - uncompressed) with its paired 95% interval
    (normal approximation of the per-image differences, as ``velcro.evaluate``'s
    ``paired_difference``), the images lost and gained, the top-1 agreement and the mean KL
    divergence of the softmax.
    """
    tally = compare_outputs(reference, outputs, labels)
    n = tally.images
    difference = (tally.correct - tally.baseline_correct) / n
    right_before = reference.argmax(1) == labels
    right_after = outputs.argmax(1) == labels
    per_image = right_after.double() - right_before.double()
    half = Z95 * float(per_image.std(correction=1)) / math.sqrt(n) if n > 1 else 0.0
    return {"images": n, "baseline_accuracy": tally.baseline_correct / n,
            "accuracy": tally.correct / n, "difference": difference,
            "ci95": [difference - half, difference + half], "lost": tally.lost,
            "gained": tally.gained, "agreement": 1 - tally.changed / n,
            "kl": tally.kl_sum / n}


def holds(figures: dict) -> bool:
    """Issue 14's verdict on one run: held-out change >= -0.5 points, or 0 in its 95% CI."""
    return figures["difference"] >= -JUDGE_LOSS - 1e-12 or figures["ci95"][1] >= 0.0


def _head(model: nn.Module) -> list[nn.Module]:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1:]


def magnitude_pruned(model: nn.Module, ratio: float, example: torch.Tensor,
                     global_pruning: bool = False, keep: Sequence[str] = ()) -> nn.Module:
    """Torch-Pruning's ``MagnitudePruner`` (L2 group norm, couplings pruned together), one
    ratio, no fine-tuning; the classifier head and the modules named in ``keep`` are left
    whole."""
    import torch_pruning as tp

    pruned = copy.deepcopy(model).eval()
    if ratio > 0:
        kept = _head(pruned) + [pruned.get_submodule(name) for name in keep]
        pruner = tp.pruner.MagnitudePruner(
            pruned, example, importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=ratio, global_pruning=global_pruning, ignored_layers=kept)
        pruner.step()
    return pruned.eval()


def residual_convolutions(model: nn.Module) -> list[str]:
    """The CIFAR ResNets' convolutions whose outputs meet a residual addition (the stem and
    every block's ``conv2``). Torch-Pruning's dependency graph does not see the parameter-free
    "option A" shortcut (subsample and zero-pad the channels), so pruning them breaks the
    additions; a user keeps them whole and prunes each block's inner ``conv1``."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)
            and (name == "conv1" or name.endswith(".conv2"))]


def guarded_ratio(levels: Sequence[float], measure: Callable[[float, str], object],
                  guard: Guard, patience: int | None, check: bool) -> tuple[float, list]:
    """One pruning ratio chosen as velcro's search chooses its thresholds.

    The ratios ``levels`` are tried ascending on the search images (``measure(ratio,
    "search")`` returns a ``Tally`` against the uncompressed model) until ``patience``
    consecutive ones fail the guard; with ``check``, the feasible ones are then tested in
    ascending order on the check images (``measure(ratio, "check")``), stopping at the first
    failure, as velcro's nested check does.

    Returns:
        The chosen ratio (0: none) and the log of ``(ratio, part, passed)``.
    """
    log, feasible, misses = [], [], 0
    for ratio in sorted(levels):
        passed = guard.passes(measure(ratio, "search"))
        log.append((ratio, "search", passed))
        if passed:
            feasible.append(ratio)
            misses = 0
        else:
            misses += 1
            if patience is not None and misses >= patience:
                break
    if not check:
        return (max(feasible) if feasible else 0.0), log

    def passes(ratio: float) -> bool:
        passed = guard.passes(measure(ratio, "check"))
        log.append((ratio, "check", passed))
        return passed

    chosen, _ = fixed_sequence(feasible, passes)
    return (feasible[chosen] if chosen is not None else 0.0), log
