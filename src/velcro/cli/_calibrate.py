"""`velcro calibrate`: per-site activation statistics on a task's calibration images."""

from __future__ import annotations

import argparse
from pathlib import Path

import velcro
from velcro._format import plural
from velcro._io import atomic_group
from velcro.cli import _common as common
from velcro.cli import _values as values
from velcro.cli._files import Files
from velcro.data import Split, split
from velcro.distributed import is_main
from velcro.errors import VelcroError

DESCRIPTION = """\
Run the unchanged model on the task's calibration images (a seeded 2% of the task's images by
default; the rest is the validation set) and save every activation site's mean and variance.
The split is saved beside the statistics so that evaluation uses the disjoint images.

The images are preprocessed as the registered model's weights expect (--model
cifar_resnet56: 32x32, no resize; efficientnet_lite0: TensorFlow's crop, bicubic, 0..255),
or with torchvision's ImageNet transform for a model of your own; --resize, --crop, --mean,
--std, --interpolation, --scale and --crop-fraction change single settings. What was used is
recorded in the statistics and the split, and reused by search, evaluate and sweep.

examples:
  velcro calibrate imagenet/val --task cats --class-list LOC_synset_mapping.txt \\
      --model resnet18 --weights resnet18-f37072fd.pth -o cats.stats.safetensors
  velcro calibrate cifar10/test --task cifar-cats-dogs --model cifar_resnet56 \\
      --weights resnet56.safetensors --search-fraction 0.2 -o catdog.stats.safetensors
"""


def add_parser(subparsers) -> None:
    parser = common.new_parser(
        subparsers, "calibrate", help="activation statistics on a task's calibration images",
        description=DESCRIPTION)
    common.add_data_options(parser, split_help="reuse this split (from an earlier run) "
                                               "instead of drawing a new one")
    common.add_model_options(parser)
    group = parser.add_argument_group("output and split")
    group.add_argument("-o", "--output", required=True, metavar="STATS",
                       help="statistics file to write (.safetensors)")
    group.add_argument("--split-out", metavar="FILE",
                       help="where to save the new split (default: STATS with .split.json)")
    group.add_argument("--calibration-fraction", type=values.fraction(open_low=True,
                                                                      open_high=True),
                       default=0.02, metavar="F",
                       help="share of the task's images used for calibration (default 0.02)")
    group.add_argument("--search-fraction", type=values.fraction(open_high=True), default=0.0,
                       metavar="F",
                       help="share set aside for a threshold search (default 0)")
    group.add_argument("--seed", type=values.SEED, default=0, help="split seed (default 0)")
    group.add_argument("--covariance", action="store_true",
                       help="also keep each site's channel covariance (channels^2 float64 per "
                            "site), needed by --constant affine plans")
    common.add_runtime_options(parser)
    parser.set_defaults(run=run, preflight=preflight)


def _split_path(args: argparse.Namespace) -> Path:
    if args.split_out:
        return Path(args.split_out)
    out = Path(args.output)
    return out.with_name(out.name.removesuffix(".safetensors") + ".split.json")


def preflight(args: argparse.Namespace) -> Files:
    """The options checked before any work, and the files read and written."""
    if not args.split and args.calibration_fraction + args.search_fraction >= 1:
        raise VelcroError(f"--calibration-fraction {args.calibration_fraction:g} and "
                          f"--search-fraction {args.search_fraction:g} leave no validation "
                          "images; make their sum less than 1")
    common.check_data_options(args)
    files = Files()
    files.read_model(args)
    files.read_data(args)
    files.write("--output", args.output)
    if not args.split:
        files.write("--split-out", _split_path(args))
    return files


def run(args: argparse.Namespace) -> int:
    stats_path = common.check_output(args.output, "--output")
    split_path = None if args.split else common.check_output(_split_path(args), "--split-out")
    if split_path is not None and split_path.resolve() == stats_path.resolve():
        raise VelcroError("--split-out and --output name the same file; give two names")
    device = common.resolve_device(args.device)
    model = common.load_model(args, device)
    data = common.open_task_data(args)
    folder = data.folder
    task_classes = data.classes or folder.classes  # with those that have no folder here
    the_split = data.split
    if the_split is None:
        fractions = {"calibration": args.calibration_fraction}
        if args.search_fraction:
            fractions["search"] = args.search_fraction
        fractions["validation"] = None
        parts = split(folder.samples, fractions, seed=args.seed, labels=folder.targets)
        the_split = Split(parts, str(folder.root.resolve()), args.seed, fractions, {
            "task": data.task, "classes": task_classes,
            "class_to_index": folder.class_to_index, "labels": folder.label_mode,
            "model": args.model, **data.record(),
        })
    loader = common.make_loader(folder.subset(the_split["calibration"]), args, device)
    stats = velcro.calibrate(model, loader, max_images=args.max_images,
                             progress=common.progress(args), covariance=args.covariance)
    skipped = loader.skipped_list()
    split_file = str(split_path if split_path is not None else args.split)
    stats.info.update({
        **common.recorded_model_info(args), "weights_fingerprint": stats.weights,
        "task": data.task, "classes": task_classes, "classes_with_images": folder.classes,
        "data": str(folder.root.resolve()), "split": split_file,
        "input_shape": stats.info.get("input_shape"), **data.record(), "skipped": skipped,
    })
    if is_main():  # under torchrun every rank holds the same merged stats; one writes
        with atomic_group():  # both files, or neither: no statistics without their split
            stats.save(stats_path)
            if split_path is not None:
                the_split.save(split_path)

    elements = sum(s.mean.numel() for s in stats.sites.values())
    summary = {
        "command": "calibrate", **common.model_info(args), "task": data.task,
        "classes": task_classes, "classes_with_images": folder.classes,
        "input_shape": stats.info.get("input_shape"), **data.record(),
        "data": str(folder.root.resolve()),
        "split": split_file, "split_counts": the_split.counts(),
        "calibration_images": stats.count, "skipped": skipped,
        "sites": len(stats), "activation_elements": elements, "stats": str(stats_path),
        "covariance_bytes": sum(s.comoment.numel() * 8 for s in stats.sites.values()
                                if s.comoment is not None),
    }
    counts = ", ".join(f"{n} {name}" for name, n in the_split.counts().items())
    lines = [
        f"calibrated {type(model).__name__} on {plural(stats.count, 'image')} "
        f"(task {data.task or 'all folders'}; split {counts})",
        f"{plural(len(stats), 'activation site')}, {plural(elements, 'element')} per image"
        + (f"; channel covariances {summary['covariance_bytes'] / 2**20:.1f} MiB"
           if args.covariance else ""),
        *data.lines(),
        f"wrote {stats_path}" + (f" and {split_path}" if split_path is not None else ""),
        *common.skipped_lines(skipped),
    ]
    common.emit(args, summary, lines)
    return 0
