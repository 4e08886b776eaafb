"""Task data: image folders with ImageNet preprocessing, task presets and seeded splits.

Example:
    >>> from velcro.data import ImageFolder, ImageLoader, Split, resolve_task, split
    >>> name, classes = resolve_task("cats")
    >>> folder = ImageFolder("imagenet/val", classes=classes,
    ...                      class_list="LOC_synset_mapping.txt")
    >>> parts = split(folder.samples, seed=0, labels=folder.targets)
    >>> stats = velcro.calibrate(model, ImageLoader(folder.subset(parts["calibration"])))
"""

from velcro.data._loader import ImageLoader
from velcro.data._preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from velcro.data.folder import (
    IMAGE_EXTENSIONS,
    ImageFolder,
    UnreadableImage,
    read_class_list,
)
from velcro.data.splits import DEFAULT_FRACTIONS, Split, split
from velcro.data.tasks import TASKS, Task, get_task, parse_classes, resolve_task

__all__ = [
    "DEFAULT_FRACTIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "ImageFolder",
    "ImageLoader",
    "Preprocess",
    "Split",
    "TASKS",
    "Task",
    "UnreadableImage",
    "get_task",
    "parse_classes",
    "read_class_list",
    "resolve_task",
    "split",
]
