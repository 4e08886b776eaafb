"""Options and helpers the subcommands share: model, device, data, outputs, printing."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
import torch.nn as nn

from velcro._format import plural
from velcro._io import output_problem, write_text_atomic
from velcro.cli import _values as values
from velcro.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TASKS,
    ImageFolder,
    ImageLoader,
    Preprocess,
    Split,
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
                            "pickled code), e.g. torchvision's resnet18-f37072fd.pth")
    group.add_argument("--num-classes", type=values.CLASS_COUNT, default=None, metavar="N",
                       help="classes of a registered model's head (default 1000)")


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
                       help="task classes: indices, ranges and wnids, e.g. 281,282 or 151-268")
    group.add_argument("--class-list", metavar="FILE",
                       help="wnids in class-index order, one per line (LOC_synset_mapping.txt), "
                            "for class folders named by wnid")
    group.add_argument("--labels", default="auto", choices=LABEL_MODES,
                       help="how class folders map to class indices (default auto)")
    group.add_argument("--split", metavar="FILE", help=split_help)
    group.add_argument("--resize", type=values.IMAGE_SIDE, default=256, metavar="PX",
                       help="shorter side after resizing (default 256; 0: no resize)")
    group.add_argument("--crop", type=values.IMAGE_SIDE, default=224, metavar="PX",
                       help="center-crop size (default 224; 0: no crop)")
    group.add_argument("--mean", default=",".join(map(str, IMAGENET_MEAN)), metavar="R,G,B",
                       help="normalisation mean (default ImageNet's)")
    group.add_argument("--std", default=",".join(map(str, IMAGENET_STD)), metavar="R,G,B",
                       help="normalisation std (default ImageNet's)")
    group.add_argument("--max-images", type=values.POSITIVE, default=None, metavar="N",
                       help="use at most N images")


# ---- model and device ------------------------------------------------------------------

def resolve_device(text: str | None) -> torch.device:
    """``auto`` -> cuda when available else cpu; unavailable devices are a VelcroError."""
    if text in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise VelcroError(f"--device '{text}' is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise VelcroError(f"--device {text}: no CUDA device is available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise VelcroError(f"--device {text}: only {torch.cuda.device_count()} CUDA "
                              "device(s); use cuda:0")
    elif device.type != "cpu":
        raise VelcroError(f"--device '{text}' is not supported; use cpu or cuda")
    return device


def _import_module(spec: str) -> ModuleType:
    if spec.endswith(".py") or os.sep in spec or "/" in spec:
        path = Path(spec)
        if not path.is_file():
            raise VelcroError(f"--model: file '{path}' does not exist")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        if module_spec is None or module_spec.loader is None:
            raise VelcroError(f"--model: cannot import '{path}' as Python")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module
    # a console script does not put the working folder on sys.path; `python -m` does
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as exc:
        if exc.name and spec.startswith(exc.name):
            raise VelcroError(
                f"--model: no module named '{spec}'; run from the folder that holds it or add "
                "that folder to PYTHONPATH"
            ) from None
        raise


def _from_factory(spec: str) -> nn.Module:
    module_name, _, factory_name = spec.rpartition(":")
    if not module_name or not factory_name:
        raise VelcroError(f"--model '{spec}' must be NAME or MODULE:FACTORY")
    try:
        module = _import_module(module_name)
    except VelcroError:
        raise
    except Exception as exc:  # the user's module failed to import: say why, in one line
        raise VelcroError(f"--model: importing '{module_name}' failed: "
                          f"{type(exc).__name__}: {_one_line(exc)}") from None
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise VelcroError(f"--model: module '{module_name}' has no callable '{factory_name}'")
    try:
        model = factory()
    except VelcroError:
        raise
    except Exception as exc:
        raise VelcroError(f"--model: {spec}() failed: {type(exc).__name__}: "
                          f"{_one_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise VelcroError(f"--model: {spec}() returned {type(model).__name__}, not a "
                          "torch.nn.Module")
    return model


def load_model(args: argparse.Namespace, device: torch.device | None = None) -> nn.Module:
    """The model named by ``--model``, with ``--weights`` loaded, in eval mode on the device."""
    from velcro import models
    spec = args.model
    if spec.endswith(".json"):  # a model saved by `velcro compress --trim`
        if args.weights:
            raise VelcroError(f"--model {spec} is a trimmed model with its weights beside it; "
                              "leave out --weights")
        model = velcro_api("load_trimmed")(spec)
    elif ":" in spec and not os.path.exists(spec):
        model = _from_factory(spec)
        if args.weights:
            models.load_weights(model, args.weights)
    else:
        model = models.create(spec, num_classes=args.num_classes or 1000, weights=args.weights)
    return model.eval().to(device or resolve_device(getattr(args, "device", None)))


def model_info(args: argparse.Namespace) -> dict:
    return {"model": args.model, "weights": args.weights}


def named(option: str, path: object, check, *args):
    """Run ``check(*args)``; a VelcroError it raises is prefixed with the option and file."""
    try:
        return check(*args)
    except VelcroError as exc:
        raise VelcroError(f"{option} '{path}': {exc}") from None


def velcro_api(name: str):
    """A function of the velcro package that may not exist in every build (trim, export)."""
    import velcro

    found = getattr(velcro, name, None)
    if isinstance(found, ModuleType):
        found = getattr(found, name, None)
    if found is None:
        try:
            module = importlib.import_module(f"velcro.{name.removesuffix('_onnx')}")
            found = getattr(module, name, None)
        except ImportError:
            found = None
    if not callable(found):
        raise VelcroError(f"this velcro installation has no velcro.{name}; update velcro")
    return found


# ---- data ------------------------------------------------------------------------------

@dataclass
class TaskData:
    """The task's images (every one) and what the command line said about them."""

    folder: ImageFolder
    task: str | None
    classes: list[int] | None
    split: Split | None
    class_list: list[str] | None


def _floats(text: str, option: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise VelcroError(f"{option} '{text}' is not a comma list of numbers") from None
    if not values or any(math.isnan(v) for v in values):
        raise VelcroError(f"{option} '{text}' is not a comma list of numbers")
    return values


def preprocess_from(args: argparse.Namespace) -> Preprocess:
    if args.resize < 0 or args.crop < 0:
        raise VelcroError("--resize and --crop are sizes in pixels (0 turns them off)")
    return Preprocess(resize=args.resize or None, crop=args.crop or None,
                      mean=_floats(args.mean, "--mean"), std=_floats(args.std, "--std"))


def check_data_options(args: argparse.Namespace) -> None:
    """The data options that need no image and no model, checked before any work:
    normalisation, sizes, and --classes (a range is bounded before it is expanded)."""
    preprocess_from(args)
    class_list = (named("--class-list", args.class_list, read_class_list, args.class_list)
                  if args.class_list else None)
    resolve_task(args.task, args.classes, class_list)


def open_task_data(args: argparse.Namespace) -> TaskData:
    """The task's image folder from DATA, --task/--classes, --class-list and --split."""
    split = Split.load(args.split) if args.split else None
    root = args.data or (split.root if split else None)
    if not root:
        raise VelcroError("give the image folder DATA (or a --split that records it)")
    class_list = (named("--class-list", args.class_list, read_class_list, args.class_list)
                  if args.class_list else None)
    task, classes = resolve_task(args.task, args.classes, class_list)
    labels: object = args.labels
    if split is not None:
        if task is None and split.info.get("classes") is not None:
            task, classes = split.info.get("task"), [int(c) for c in split.info["classes"]]
        mapping = split.info.get("class_to_index")
        if class_list is None and args.labels == "auto" and mapping:
            labels = {str(k): int(v) for k, v in mapping.items()}
    folder = ImageFolder(root, classes=classes, class_list=class_list, labels=labels,
                         preprocess=preprocess_from(args))
    if folder.skipped:
        note(skipped_entries(folder.root, folder.skipped))
    return TaskData(folder, task, classes, split, class_list)


def skipped_entries(root: Path, skipped: dict[str, str], limit: int = 5) -> str:
    """One line: how many entries of the data folder were left out, the first few and why."""
    shown = "; ".join(f"'{path}' ({reason})" for path, reason in list(skipped.items())[:limit])
    more = f"; and {len(skipped) - limit} more" if len(skipped) > limit else ""
    return f"skipped {len(skipped)} entries of '{root}': {shown}{more}"


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


def percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] if text else type(exc).__name__


def output_base(plan_path: Path) -> Path:
    """``cats.plan.json`` -> ``cats``: the stem the summary and report are named after."""
    name = plan_path.name
    for suffix in (".plan.json", ".json"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return plan_path.with_name(name or "search")
