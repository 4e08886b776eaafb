"""Specialized tasks: named sets of class indices (ImageNet-1k, CIFAR-10), ``--classes`` parsing.

ImageNet class indices are those of torchvision's (and Keras') ImageNet-1k models, i.e. the
position of the class's WordNet id in the sorted list of the 1000 ILSVRC-2012 wnids.

ImageNet presets:

- ``cats``: 281-285, the domestic cats: tabby (n02123045), tiger cat (n02123159),
  Persian (n02123394), Siamese (n02123597), Egyptian cat (n02124075). The wild cats
  (286 cougar ... 293 cheetah) are not in the task.
- ``dogs``: 151-268, the 118 domestic dog breeds (Chihuahua ... Mexican hairless); wolves,
  foxes and wild dogs (269-280) are not.
- ``cars``: the ten ImageNet-1k classes under WordNet's ``car, auto, automobile``
  (n02958343): 407 ambulance, 436 beach wagon, 468 cab, 511 convertible, 609 jeep,
  627 limousine, 656 minivan, 661 Model T, 751 racer, 817 sports car. We take WordNet's
  own hierarchy rather than a hand-picked list so the choice is reproducible. Left out:
  705 "passenger car" (a railway coach), 717 pickup, 734 police van, 675 moving van and
  864 tow truck (trucks in WordNet), 654 minibus and the buses, 573 go-kart, 575 golf cart,
  and the car parts 479 car wheel, 581 grille, 475 car mirror. Give ``--classes`` for any
  other choice (e.g. ``--classes 436,468,511,609,627,656,717,751,817``).

CIFAR-10 presets (class order of its ``classes.txt``: 0 airplane, 1 automobile, 2 bird, 3 cat,
4 deer, 5 dog, 6 frog, 7 horse, 8 ship, 9 truck), the tasks of the papers' CIFAR experiments:

- ``cifar-cats-dogs``: 3 cat, 5 dog.
- ``cifar-vehicles``: 0 airplane, 1 automobile, 8 ship, 9 truck.
- ``cifar-animals``: 2 bird, 3 cat, 4 deer, 5 dog, 6 frog, 7 horse.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from velcro._format import plural
from velcro.errors import VelcroError

# More classes than any classifier head has (ImageNet-21k has 21,843): a class index or range
# beyond it is a typo, and is refused before a range is expanded into a set of integers.
MAX_CLASSES = 100_000


@dataclass(frozen=True)
class Task:
    """A specialized task: a name and the class indices whose images it holds.

    Example:
        >>> task = get_task("cats")
        >>> task.name, task.classes
        ('cats', (281, 282, 283, 284, 285))
    """

    name: str
    classes: tuple[int, ...]
    description: str


TASKS: dict[str, Task] = {
    "cats": Task("cats", tuple(range(281, 286)),
                 "ImageNet domestic cats: tabby, tiger cat, Persian, Siamese, Egyptian cat"),
    "dogs": Task("dogs", tuple(range(151, 269)), "ImageNet's 118 dog breeds"),
    "cars": Task("cars", (407, 436, 468, 511, 609, 627, 656, 661, 751, 817),
                 "ImageNet classes under WordNet's car/automobile: ambulance, beach wagon, "
                 "cab, convertible, jeep, limousine, minivan, Model T, racer, sports car"),
    "cifar-cats-dogs": Task("cifar-cats-dogs", (3, 5), "CIFAR-10 cat and dog"),
    "cifar-vehicles": Task("cifar-vehicles", (0, 1, 8, 9),
                           "CIFAR-10 airplane, automobile, ship, truck"),
    "cifar-animals": Task("cifar-animals", (2, 3, 4, 5, 6, 7),
                          "CIFAR-10 bird, cat, deer, dog, frog, horse"),
}


def get_task(name: str) -> Task:
    """The preset task called ``name``.

    Args:
        name: ``cats``, ``dogs`` or ``cars`` (ImageNet), ``cifar-cats-dogs``,
            ``cifar-vehicles`` or ``cifar-animals`` (CIFAR-10).

    Raises:
        VelcroError: unknown name.

    Example:
        >>> get_task("cats").classes
        (281, 282, 283, 284, 285)
    """
    task = TASKS.get(name.strip().lower())
    if task is None:
        raise VelcroError(
            f"unknown task '{name}'; use one of {', '.join(TASKS)}, or --classes for any set"
        )
    return task


def parse_classes(text: str, class_list: Sequence[str] | None = None) -> list[int]:
    """Class indices from a comma list of indices, ranges and (with a class list) wnids.

    Args:
        text: e.g. ``"281,282"``, ``"151-268"`` or ``"n02123045,n02123159"``.
        class_list: the wnids in index order, needed to resolve wnids.

    Returns:
        Sorted, distinct class indices.

    Raises:
        VelcroError: a token that is not an index, a range or a known wnid.

    Example:
        >>> parse_classes("281-283,285")
        [281, 282, 283, 285]
    """
    index_of = {wnid: i for i, wnid in enumerate(class_list or [])}
    classes: set[int] = set()
    tokens = [t.strip() for t in text.split(",") if t.strip()]
    if not tokens:
        raise VelcroError("--classes is empty; give class indices such as 281,282 or 151-268")
    for token in tokens:
        if token in index_of:
            classes.add(index_of[token])
            continue
        low, dash, high = token.partition("-")
        try:
            first = int(low)
            last = int(high) if dash else first
        except ValueError:
            hint = ("it is not in the class list" if class_list
                    else "give --class-list to use WordNet ids")
            raise VelcroError(
                f"--classes: unknown class '{token}' ({hint}); give indices such as 281, "
                "ranges such as 151-268, or wnids from the class list"
            ) from None
        if first < 0 or last < first:
            raise VelcroError(
                f"--classes: '{token}' is not a valid index or range; indices are >= 0 and "
                "ranges go low-high"
            )
        # checked before the range is expanded: 0-99999999999 would not fit in memory
        if class_list and last >= len(class_list):
            raise VelcroError(
                f"--classes: class {max(first, len(class_list))} is out of range for the class "
                f"list of {plural(len(class_list), 'class', 'classes')}; give indices below "
                f"{len(class_list)}"
            )
        if last >= MAX_CLASSES:
            raise VelcroError(
                f"--classes: '{token}' goes beyond class {MAX_CLASSES - 1}, more classes than "
                "any model has; give the task's class indices"
            )
        classes.update(range(first, last + 1))
    return sorted(classes)


def resolve_task(
    task: str | None = None,
    classes: str | Sequence[int] | None = None,
    class_list: Sequence[str] | None = None,
) -> tuple[str | None, list[int] | None]:
    """The task's name and class indices from a preset name or an explicit class set.

    Args:
        task: a preset name, or None.
        classes: a ``--classes`` string or a sequence of indices, or None.
        class_list: wnids in index order, to resolve wnids in ``classes``.

    Returns:
        ``(name, classes)``; ``(None, None)`` when neither is given (every class).

    Raises:
        VelcroError: both given, unknown names or classes, or a single class (a constant
            model reaches its top-1, so "no loss" would mean nothing).

    Example:
        >>> resolve_task("cats")
        ('cats', [281, 282, 283, 284, 285])
        >>> resolve_task(classes="1,3")
        ('custom', [1, 3])
    """
    if task and classes is not None:
        raise VelcroError("give either --task or --classes, not both")
    if task:
        return get_task(task).name, list(get_task(task).classes)
    if classes is None:
        return None, None
    if isinstance(classes, str):
        values = parse_classes(classes, class_list)
    else:
        values = sorted({int(c) for c in classes})
        if not values or values[0] < 0:
            raise VelcroError("classes must be a non-empty set of indices >= 0")
    if len(values) == 1:
        # a constant model predicting that class reaches 100% top-1: "no accuracy loss"
        # would hold for any compression, so the task says nothing about the plan
        raise VelcroError(
            f"--classes: a task with a single class ({values[0]}) is refused: a constant "
            "model reaches its top-1, so 'no accuracy loss' means nothing; give at least two "
            "classes"
        )
    return "custom", values
