"""How figures are written for people: counts with their noun, percentages, signed changes.

One place for these, so that the reprs, the command line, the reports and the demo say
"1 image" and "2 images", and write a drop as a drop ("−1.20 pp", with a real minus sign).
"""

from __future__ import annotations

MINUS = "\u2212"  # a typographic minus: a drop reads as a drop, not as a hyphen

_IRREGULAR = {"index": "indices", "matrix": "matrices"}


def _plural_noun(noun: str) -> str:
    head, _, last = noun.rpartition(" ")
    if last in _IRREGULAR:
        word = _IRREGULAR[last]
    elif last.endswith(("s", "x", "ch", "sh")):
        word = last + "es"
    elif last.endswith("y") and last[-2:-1] not in tuple("aeiou"):
        word = last[:-1] + "ies"
    else:
        word = last + "s"
    return f"{head} {word}" if head else word


def plural(count: int | float, noun: str, plural_form: str | None = None) -> str:
    """``count`` and its noun, singular for exactly one: ``1 image``, ``2 images``.

    Integers get thousands separators (``1,300 images``).

    Example:
        >>> plural(1, "image"), plural(1300, "image"), plural(2, "task class")
        ('1 image', '1,300 images', '2 task classes')
    """
    word = noun if count == 1 else (plural_form or _plural_noun(noun))
    number = f"{count:,}" if isinstance(count, int) else f"{count:g}"
    return f"{number} {word}"


def percent(value: float | None, digits: int = 2) -> str:
    """``0.2773`` -> ``27.73%``; None -> an en dash.

    Example:
        >>> percent(0.2773), percent(None)
        ('27.73%', '–')
    """
    return "–" if value is None else f"{100 * value:.{digits}f}%"


def signed(value: float, digits: int = 2, unit: str = "") -> str:
    """A change with its sign, a real minus for a drop: ``+0.40``, ``−1.20``, ``0.00``.

    Example:
        >>> signed(-1.2, 1), signed(0.4), signed(-0.001)
        ('−1.2', '+0.40', '0.00')
    """
    text = f"{value:.{digits}f}"
    if text.lstrip("-").strip("0.") == "":  # rounds to zero: no sign either way
        return text.lstrip("-") + unit
    return (MINUS + text[1:] if text.startswith("-") else "+" + text) + unit


def points(value: float | None, digits: int = 2) -> str:
    """An accuracy difference (a fraction) in signed percentage points: ``−1.20 pp``.

    Example:
        >>> points(-0.012), points(0.004, 1)
        ('−1.20 pp', '+0.4 pp')
    """
    return "–" if value is None else signed(100 * value, digits, " pp")


def tone(value: float | None, digits: int = 2) -> str:
    """``down`` for a change that shows as negative, ``up`` for positive, else ``""``.

    Example:
        >>> tone(-0.012), tone(0.0), tone(1e-9)
        ('down', '', '')
    """
    if value is None:
        return ""
    shown = round(100 * value, digits)
    return "down" if shown < 0 else "up" if shown > 0 else ""


def scaled(value: int | float, digits: int = 2) -> str:
    """A large count with an SI prefix: ``1814073344`` -> ``1.81 G``; below 1,000 as is.

    Example:
        >>> scaled(1_814_073_344), scaled(11_689_512), scaled(512)
        ('1.81 G', '11.69 M', '512')
    """
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.{digits}f} {prefix}"
    return f"{value:g}"


def shape_text(shape) -> str:
    """``(64, 8, 8)`` -> ``64x8x8``.

    Example:
        >>> shape_text((64, 8, 8))
        '64x8x8'
    """
    return "x".join(str(int(s)) for s in shape) or "scalar"


OBJECTIVE_LABELS = {
    "saving_ratio": "C (compression-saving ratio)",
    "macs": "MACs in replaced producers",
}


def objective_label(objective: str) -> str:
    """What a search objective measures, in words (the name itself if unknown).

    Example:
        >>> objective_label("macs")
        'MACs in replaced producers'
    """
    return OBJECTIVE_LABELS.get(objective, objective)
