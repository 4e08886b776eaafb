"""One evaluated plan of a sweep as a row (a *point*), and its share of zero constants."""

from __future__ import annotations

from velcro.plan import Plan


def zero_elements(plan: Plan) -> tuple[int, int]:
    """``(compressed elements, those whose constant is exactly 0.0)`` over all sites.

    Example:
        >>> compressed, zeros = zero_elements(plan)
        >>> zeros / compressed  # the share of replaced elements whose constant is 0.0
    """
    compressed = zeros = 0
    for name, site in plan.sites.items():
        if site.units.numel() == 0:
            continue
        mask = plan.mask(name)
        compressed += int(mask.sum())
        zeros += int((site.constant[mask] == 0).sum())
    return compressed, zeros


def point(plan: Plan, report, baseline, **fields) -> dict:
    compressed, zeros = zero_elements(plan)
    return {
        **fields,
        "granularity": plan.granularity,
        "saving_ratio": plan.saving_ratio,
        "accuracy": report.accuracy,
        "correct": report.correct,
        "images": report.images,
        "baseline_accuracy": baseline.accuracy,
        "baseline_correct": baseline.correct,
        "compressed_elements": compressed,
        "zero_elements": zeros,
        "zero_share": zeros / compressed if compressed else 0.0,
    }
