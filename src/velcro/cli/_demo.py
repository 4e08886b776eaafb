"""`velcro demo`: the whole idea on real images in a few minutes, nothing to download."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from velcro.cli import _common as common
from velcro.cli import _values as values
from velcro.cli._files import Files

DESCRIPTION = """\
Train the built-in ResNet-18 on scikit-learn's bundled handwritten digits (upscaled to 32x32;
trained once, then loaded from the cache), specialize it to a task of a few digits: calibrate on
20% of the task's training images, search element (VELCRO) and channel (S-VELCRO) plans at no
accuracy loss on the other 80%, trim the channel plan, and evaluate everything on the task's
held-out test images. Prints a table and writes results, plans and a report to --out.

The cache folder is $VELCRO_CACHE, else $XDG_CACHE_HOME/velcro, else ~/.cache/velcro.

examples:
  velcro demo
  velcro demo --task 4,7,9 --seed 1 --out demo-479
"""


def add_parser(subparsers) -> None:
    parser = common.new_parser(
        subparsers, "demo", help="compress a digits classifier for a few digits, end to end",
        description=DESCRIPTION)
    parser.add_argument("--task", default="3,8", metavar="DIGITS",
                        help="the task's digits, comma-separated (default 3,8)")
    parser.add_argument("--seed", type=values.SEED, default=0,
                        help="seed of the data split and the training (default 0)")
    parser.add_argument("--budget", type=values.POSITIVE, default=None, metavar="N",
                        help="most candidate evaluations per search (default: the demo's "
                             "schedule, about 90)")
    parser.add_argument("--out", default="velcro-demo", metavar="DIR",
                        help="output folder (default ./velcro-demo)")
    parser.add_argument("--cache-dir", default=None, metavar="DIR",
                        help="folder of the cached weights (default: see above)")
    parser.add_argument("--retrain", "--no-cache", dest="retrain", action="store_true",
                        help="train again instead of loading the cached weights (and "
                             "overwrite them)")
    parser.add_argument("--json", action="store_true",
                        help="print the results as JSON on stdout instead of the table")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=run, preflight=preflight)


def preflight(args: argparse.Namespace) -> Files:
    """--out is checked now, not after minutes of training and searching; the cached
    weights the demo reads may not be one of its outputs."""
    from velcro.demo import OUTPUT_FILES
    from velcro.demo._digits_model import Recipe, cache_dir, weights_path

    files = Files()
    if not args.retrain:
        files.read("--cache-dir", weights_path(Recipe(), args.seed, cache_dir(args.cache_dir)))
    out = Path(args.out)
    files.folders.append(("--out", out))
    for name in OUTPUT_FILES:
        files.write("--out", out / name)
    return files


def run(args: argparse.Namespace) -> int:
    from velcro.demo import run_demo

    result = run_demo(
        args.task,
        seed=args.seed,
        budget=args.budget,
        cache_dir=args.cache_dir,
        use_cache=not args.retrain,
        out_dir=args.out,
        progress=common.progress(args),
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
        return 0
    print(result.table())
    for path in result.files:
        print(f"wrote {path}")
    return 0
