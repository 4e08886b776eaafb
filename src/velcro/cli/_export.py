"""`velcro export`: the original, compressed or trimmed model as ONNX."""

from __future__ import annotations

import argparse

import torch

import velcro
from velcro.apply import check_plan_fits
from velcro.cli import _common as common
from velcro.cli._files import Files
from velcro.errors import VelcroError
from velcro.export import onnxruntime_difference
from velcro.plan import Plan

DESCRIPTION = """\
Export to ONNX: the model as is, with a plan's constants (--plan), or trimmed (--plan
--trim: the constant filters removed), with PyTorch's exporter (torch.export). The file is
written only once onnxruntime (when installed) computes what PyTorch computes.

example:
  velcro export --model resnet18 --weights resnet18-f37072fd.pth --plan cats.plan.json \\
      --trim -o cats.trimmed.onnx
"""


def add_parser(subparsers) -> None:
    parser = common.new_parser(
        subparsers, "export", help="write the (compressed) model as ONNX",
        description=DESCRIPTION)
    common.add_model_options(parser)
    parser.add_argument("--plan", metavar="FILE", help="export the model compressed by this plan")
    parser.add_argument("--trim", action="store_true", help="export the trimmed model")
    parser.add_argument("-o", "--output", required=True, metavar="FILE.onnx")
    parser.add_argument("--input-shape", default=None, metavar="C,H,W",
                        help=common.INPUT_SHAPE_HELP)
    parser.add_argument("--no-check", action="store_true",
                        help="do not compare onnxruntime's outputs with PyTorch's")
    common.add_runtime_options(parser, data=False)
    parser.set_defaults(run=run, preflight=preflight)


def preflight(args: argparse.Namespace) -> Files:
    """The options checked before any work, and the files read and written."""
    if args.input_shape:
        common.parse_shape(args.input_shape)
    files = Files()
    files.read_model(args)
    files.read("--plan", args.plan, tensors=True)
    files.write("--output", args.output)
    return files


def run(args: argparse.Namespace) -> int:
    out = common.check_output(args.output, "--output")
    if args.trim and not args.plan:
        raise VelcroError("--trim needs --plan FILE (a channel plan)")
    export_onnx = common.velcro_api("export_onnx")
    device = common.resolve_device(args.device)
    model = common.load_model(args, device)
    plan = None
    if args.plan:
        plan = Plan.load(args.plan)
        common.named("--plan", args.plan, check_plan_fits, model, plan)
        if args.trim:
            model = common.velcro_api("trim")(model, plan)
        else:
            model = velcro.apply(model, plan, check=False)
    model = model.eval()
    shape = common.default_input_shape(args, model, plan)
    example = torch.randn((1, *shape), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        try:
            expected = model(example)
        except (RuntimeError, VelcroError) as exc:
            raise VelcroError(f"the model does not run on an input of shape {(1, *shape)} "
                              f"({' '.join(str(exc).split())[:120]}); set --input-shape"
                              ) from None
    # atomic: the file appears whole or not at all, and only once onnxruntime agrees
    export_onnx(model, out, example, check=not args.no_check)
    difference = None if args.no_check else onnxruntime_difference(out, example, expected)
    summary = {
        "command": "export", **common.model_info(args), "onnx": str(out),
        "input_shape": [1, *shape], "plan": args.plan, "trimmed": args.trim,
        "bytes": out.stat().st_size, "onnxruntime_max_abs_difference": difference,
    }
    lines = [f"wrote {out} ({out.stat().st_size:,} bytes, input {[1, *shape]})"]
    if difference is not None:
        lines.append(f"onnxruntime vs PyTorch: max |difference| {difference:.2e}")
    common.emit(args, summary, lines)
    return 0
