"""Task data: image folders with ImageNet preprocessing, task presets and seeded splits.

Example:
    >>> from velcro.data import ImageFolder, ImageLoader, Split, resolve_task, split
    >>> name, classes = resolve_task("cats")
    >>> folder = ImageFolder("imagenet/val", classes=classes,
    ...                      class_list="LOC_synset_mapping.txt")
    >>> parts = split(folder.samples, seed=0, labels=folder.targets)
    >>> stats = velcro.calibrate(model, ImageLoader(folder.subset(parts["calibration"])))

Statistics record the preprocessing their images had; :func:`loader_for` reads a split's
images the same way again (for search and evaluation):

    >>> validation = loader_for(stats, "cats.split.json", subset="validation")
"""

from velcro.data._loader import ImageLoader
from velcro.data._preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from velcro.data._recorded import (
    describe_preprocess,
    loader_for,
    preprocess_differences,
    recorded_preprocess,
)
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
    "describe_preprocess",
    "get_task",
    "loader_for",
    "parse_classes",
    "preprocess_differences",
    "read_class_list",
    "recorded_preprocess",
    "resolve_task",
    "split",
]
