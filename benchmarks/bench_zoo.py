"""velcro on a zoo of timm architectures: what captures, trims, saves and exports.

For each model (random weights, ``pretrained=False``; constant-initialised gains such as
norm weights, zero-init residual batch-norms and layer scales redrawn in [0.5, 1.5] so that no
branch vanishes; batch-norm statistics warmed up by two train-mode passes on random data;
calibration on 8 random images at a small input size)
and channel plans at T = 0.3 and 0.5, one row with:

- capture: ``velcro.trace`` + ``velcro.calibrate`` work, else the VelcroError's first line;
- sites vs activation calls: ``velcro.find_sites`` against an independent eager count. The
  count runs the model once under a ``torch.overrides.TorchFunctionMode`` that sees every
  torch-level call (modules' forwards reach ``F.relu``/``F.silu``/... through it, functional
  and ``Tensor.relu()`` calls too; nested calls are not seen twice), keyed by function name
  (``hardtanh(0, 6)`` is relu6). "velcro kinds" are the kinds ``velcro.sites`` knows
  (relu, relu6, leaky_relu, hardtanh, elu, selu, celu, mish, silu, gelu, hardswish); "all"
  adds the gates (sigmoid, hardsigmoid, tanh), softplus and prelu
  Each traced activation node that is not a site is kept with the reason (its kind, or the
  ops that end the walk back through batch-norm, identity, dropout and additions before any
  conv/linear);
- producers trimmed: of the planned sites (>= 1 chosen channel), the share whose producer
  (``Site.producer``) no longer computes the chosen filters in ``velcro.trim``'s model: the
  module of that name is gone, or its rows matched to the original's by direction leave the
  chosen ones out (where rows keep their shape), or else it has at least as many fewer
  non-zero rows as the site chose (rows padded to ``channel_multiple`` are zero). For the
  others, the op chain from producer to site is kept;
- trim vs apply (max |a - b| / max |b| on a random batch of 2), and trim of an empty plan
  (T = 0) vs the original model;
- MACs and parameters saved (``velcro.cost``) by the model ``velcro.trim`` builds with
  ``--channel-multiple`` (default 1: exactly the filters the plan removes; the library's
  default, ``"auto"``, rounds widths only where a timed run on the target says it is faster,
  which would make the producer column depend on this machine's timings; 8 was the
  library's default until issue 17 item 6 and hides savings on narrow layers);
- save/load: ``save_trimmed`` + ``load_trimmed`` give identical outputs, else the first line;
- ONNX: ``velcro.export_onnx`` (``check=False``) of the original and the T = 0.5 trimmed
  model, onnxruntime vs torch (max relative difference), node counts and data-dependent
  nodes (``velcro.export.DATA_DEPENDENT_OPS``: ``NonZero``, ``ScatterND``, ``Where`` ...;
  marked ``dd`` after the count);
- seconds per model.

Each model runs in its own subprocess (memory is returned, a crash or timeout is one row);
the JSON is rewritten after every row.

    .venv/bin/python benchmarks/bench_zoo.py --jobs 2   # 47 models: 67 min on 2 busy cores
    .venv/bin/python benchmarks/bench_zoo.py --quick    # make bench: 4 models
    .venv/bin/python benchmarks/bench_zoo.py --models resnet18,dla34 --out runs/x

The JSON goes to runs/bench/bench_zoo/bench_zoo.json (``--out DIR`` elsewhere,
``--update-results`` into benchmarks/).

The graph and model checks live in ``zoo_checks.py`` beside this script; the findings, per
failure class, in ``zoo_diagnosis.md``.

Measured with timm 1.0.31, torch 2.13.0+cpu. timm imports ``torchvision.ops.misc`` (pure
Python), but PyPI's torchvision 0.28.0 is a CUDA build whose compiled ops do not load beside
the CPU torch, and ``import torchvision`` then fails registering fake kernels for them
("operator torchvision::nms does not exist"). Recipe:

    .venv/bin/pip install "torch==2.13.0" -e ".[dev,bench]"   # timm, torchvision 0.28.0

and, before the first ``import timm``, an empty module in place of
``torchvision._meta_registrations`` (see ``import_timm``): torchvision then imports without
its compiled ops, which timm's model definitions never call.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import _bench
from tqdm import tqdm
from zoo_checks import (
    VELCRO_KINDS,
    blockers,
    count_eager_activations,
    graph_inventory,
    node_kind,
    onnx_check,
    rel_diff,
    trimmed_producers,
)

ROOT = Path(__file__).resolve().parents[1]
THRESHOLDS = (0.3, 0.5)
SIZE = 64
# name -> (input size, create_model keyword arguments); the smallest size each accepts
MODELS: dict[str, tuple[int, dict]] = {name: (SIZE, {}) for name in (
    "vgg11_bn", "resnet18", "resnet50", "resnet18d", "resnet10t", "seresnet18", "ecaresnet26t",
    "skresnet18", "res2net50_26w_4s", "resnext26ts", "regnetx_002", "regnety_002",
    "densenet121", "dla34", "dpn68", "xception41", "cspresnet50", "cspdarknet53", "darknet53",
    "hrnet_w18_small", "resnetv2_50x1_bit", "nf_resnet26", "selecsls42b", "ese_vovnet19b_dw",
    "repvgg_a0", "mobileone_s0", "gernet_s", "mobilenetv2_100", "mobilenetv3_small_100",
    "mobilenetv4_conv_small", "efficientnet_b0", "tf_efficientnet_b0",
    "tf_mobilenetv3_small_100", "mnasnet_100", "mixnet_s", "lcnet_050", "ghostnet_100",
    "rexnet_100", "convnext_atto", "edgenext_xx_small", "mobilevit_xxs", "efficientvit_b0",
    "fastvit_t8", "efficientformer_l1",
)}
MODELS["inception_v3"] = (96, {})  # 75x75 at least
MODELS["efficientformer_l1"] = (224, {})  # attention biases fixed at 7x7 tokens
MODELS["levit_128s"] = (64, {"img_size": 64})
MODELS["vit_tiny_patch16_224"] = (64, {"img_size": 64})
QUICK = ("resnet18", "mobilenetv2_100", "efficientnet_b0", "convnext_atto")


def import_timm() -> types.ModuleType:
    """timm, with torchvision imported without its (unloadable) compiled ops."""
    sys.modules.setdefault("torchvision._meta_registrations",
                           types.ModuleType("torchvision._meta_registrations"))
    import timm

    return timm


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def build(timm, name: str, size: int, kwargs: dict):
    import torch

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs)
    with torch.no_grad():
        # constant-initialised gains (norm weights, zero-init last batch-norms of residual
        # branches, layer scales of 1e-6) would make whole branches vanish, and trim vs apply
        # check nothing there
        for param_name, param in model.named_parameters():
            if (param.dim() <= 1 and param.numel() and not param_name.endswith("bias")
                    and bool((param == param.flatten()[0]).all())):
                param.uniform_(0.5, 1.5)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # cumulative average over the warm-up batches
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, size, size))
    return model.eval()


def attempt(row: dict, key: str, fn, keep: bool = False):
    """Run one stage, timed; an exception becomes ``row[key]`` (its first line), and so
    does the result when ``keep``."""
    start = time.perf_counter()
    try:
        value = fn()
    except Exception as exc:  # every failure is a result here
        row[key] = {"error": first_line(exc)}
        value = None
    else:
        if keep:
            row[key] = value
    row.setdefault("seconds", {})[key] = round(time.perf_counter() - start, 2)
    return value


def run_model(name: str, threads: int, folder: Path, multiple: int = 1) -> dict:
    """Every measurement for one model (the worker's job)."""
    import torch

    torch.set_num_threads(threads)
    timm = import_timm()
    import velcro

    size, kwargs = MODELS.get(name, (SIZE, {}))
    row: dict = {"model": name, "input": size, "timm": timm.__version__}
    start = time.perf_counter()
    model = attempt(row, "build", lambda: build(timm, name, size, kwargs))
    if model is None:
        row["capture"] = row["build"]["error"]
        return finish(row, start)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, size, size, generator=generator)
    x = torch.randn(2, 3, size, size, generator=generator)
    with torch.no_grad():
        reference = model(x)
    row["activation_calls"] = dict(count_eager_activations(model, x))
    gm = attempt(row, "trace", lambda: velcro.trace(model, x[:1]))  # at the calibration size
    if gm is None:
        row["capture"] = row["trace"]["error"]
        return finish(row, start)
    sites = velcro.find_sites(gm)
    site_nodes = {site.node for site in sites}
    row["sites"] = dict(Counter(site.kind for site in sites))
    not_sites = Counter()
    for node in gm.graph.nodes:
        kind = node_kind(gm, node)
        if kind is None or node.name in site_nodes:
            continue
        reason = (f"{kind}: not a velcro kind" if kind not in VELCRO_KINDS else
                  f"{kind}: no conv/linear producer, stopped at "
                  + ", ".join(sorted(set(blockers(gm, node)))))
        not_sites[reason] += 1
    row["traced_activations"] = dict(Counter(filter(None, (node_kind(gm, n)
                                                           for n in gm.graph.nodes))))
    row["not_sites"] = dict(not_sites)
    stats = attempt(row, "calibrate", lambda: velcro.calibrate(
        model, [images[:4], images[4:]], progress=False))
    if stats is None:
        row["capture"] = row["calibrate"]["error"]
        return finish(row, start)
    row["capture"] = "ok"
    shape = (3, size, size)
    base = attempt(row, "cost", lambda: velcro.cost(model, x[:1]))
    row["macs"] = base.macs if base else None
    row["parameters"] = base.parameters if base else None
    attempt(row, "onnx_original", lambda: onnx_check(velcro, model, x, folder / "orig.onnx",
                                                      threads), keep=True)

    def empty_plan() -> float:
        small = velcro.trim(model, velcro.plan(stats, 0.0, granularity="channel"),
                            input_shape=shape)
        with torch.no_grad():
            return rel_diff(small(x), reference)

    attempt(row, "trim_empty_vs_original", empty_plan, keep=True)
    row["thresholds"] = {}
    for threshold in THRESHOLDS:
        entry = row["thresholds"][str(threshold)] = {}
        run_threshold(velcro, model, gm, sites, stats, base, threshold, x, shape, entry, folder,
                      threads, multiple)
    return finish(row, start)


def run_threshold(velcro, model, gm, sites, stats, base, threshold, x, shape, entry, folder,
                  threads, multiple) -> None:
    import torch

    plan = velcro.plan(stats, threshold, granularity="channel")
    entry["saving_ratio"] = plan.saving_ratio
    with torch.no_grad():
        applied = attempt(entry, "apply", lambda: velcro.apply(model, plan)(x))
    small = attempt(entry, "trim", lambda: velcro.trim(model, plan, input_shape=shape,
                                                       channel_multiple=multiple))
    if small is None:
        return
    with torch.no_grad():
        out = small(x)
    if applied is not None:
        entry["trim_vs_apply"] = rel_diff(out, applied)
    attempt(entry, "producers", lambda: trimmed_producers(gm, small, sites, plan), keep=True)
    entry["graph"] = graph_inventory(small)

    def saving() -> dict:
        return base.reduction(velcro.cost(small, x[:1]))

    if base is not None:
        attempt(entry, "saved", saving, keep=True)

    def round_trip() -> float:
        path = velcro.save_trimmed(small, folder / f"t{threshold}.json")
        with torch.no_grad():
            return float((velcro.load_trimmed(path)(x) - out).abs().max())

    attempt(entry, "save_load", round_trip, keep=True)
    if threshold == THRESHOLDS[-1]:  # one export per model is enough to see what breaks
        attempt(entry, "onnx", lambda: onnx_check(velcro, small, x, folder / "trimmed.onnx",
                                                  threads), keep=True)


def finish(row: dict, start: float) -> dict:
    row["total_seconds"] = round(time.perf_counter() - start, 1)
    return row


# -- the driver: one subprocess per model, a table at the end ------------------------------


def worker(name: str, threads: int, out: Path, multiple: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        row = run_model(name, threads, Path(folder), multiple)
    out.write_text(json.dumps(row))


def spawn(name: str, threads: int, timeout_s: float, multiple: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "row.json"
        command = [sys.executable, __file__, "--worker", name, "--threads", str(threads),
                   "--row", str(out), "--channel-multiple", str(multiple)]
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True,
                                  timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"model": name, "capture": f"timeout after {timeout_s:.0f} s",
                    "total_seconds": round(time.perf_counter() - start, 1)}
        if done.returncode == 0 and out.is_file():
            return json.loads(out.read_text())
        tail = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        return {"model": name, "capture": f"worker died: {tail}"[:300],
                "total_seconds": round(time.perf_counter() - start, 1)}


def cell(entry: dict | None, key: str, fmt) -> str:
    value = (entry or {}).get(key)
    if value is None:
        return "-"
    if isinstance(value, dict) and "error" in value:
        return "err"
    return fmt(value)


def per_threshold(row: dict, key: str, fmt) -> str:
    entries = row.get("thresholds") or {}
    return " / ".join(cell(entries.get(str(t)), key, fmt) for t in THRESHOLDS)


def share(producers: dict) -> str:
    return f"{producers['trimmed']}/{producers['planned']}"


def save_cell(value) -> str:
    return "ok" if value == 0.0 else f"diff {value:.1e}"


def nodes_cell(value: dict) -> str:
    dependent = value.get("data_dependent")
    return f"{value['nodes']}" + (f" ({dependent} dd)" if dependent else "")


def table(rows: list[dict]) -> str:
    """The Markdown table: one row per model, ``a / b`` for T = 0.3 / 0.5 (ONNX: the
    original / the model trimmed at T = 0.5)."""
    header = ("| model | in | capture | sites / act (velcro kinds) / act (all) | producers "
              "trimmed | trim vs apply | T=0 vs orig | MACs saved | params saved | save/load "
              "| ONNX rel diff orig / trim | ONNX nodes orig > trim | s |")
    lines = [header, "|" + "---|" * 13]
    percent = "{:.0%}".format
    for row in rows:
        calls = row.get("activation_calls") or {}
        velcro_calls = sum(v for k, v in calls.items() if k in VELCRO_KINDS)
        sites = sum((row.get("sites") or {}).values())
        capture = row.get("capture", "-")
        last = (row.get("thresholds") or {}).get(str(THRESHOLDS[-1])) or {}
        original_nodes = cell(row, "onnx_original", nodes_cell)
        trimmed_nodes = cell(last, "onnx", nodes_cell)
        lines.append(" | ".join([
            f"| {row['model']}", str(row.get("input", "-")),
            "ok" if capture == "ok" else capture.replace("|", "/")[:90],
            f"{sites if 'sites' in row else '-'} / {velcro_calls} / {sum(calls.values())}"
            if calls else "-",
            per_threshold(row, "producers", share),
            per_threshold(row, "trim_vs_apply", "{:.0e}".format),
            cell(row, "trim_empty_vs_original", "{:.0e}".format),
            per_threshold(row, "saved", lambda v: percent(v["macs"])),
            per_threshold(row, "saved", lambda v: percent(v["parameters"])),
            per_threshold(row, "save_load", save_cell),
            cell(row, "onnx_original", lambda v: f"{v['parity']:.0e}") + " / "
            + cell(last, "onnx", lambda v: f"{v['parity']:.0e}"),
            f"{original_nodes} > {trimmed_nodes}",
            f"{row.get('total_seconds', '-')} |",
        ]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated timm names (default: the full list)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per model")
    parser.add_argument("--jobs", type=int, default=1, help="models run at once")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per model")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--row", type=Path, help=argparse.SUPPRESS)  # a worker's output
    parser.add_argument("--channel-multiple", type=int, default=1,
                        help="velcro.trim's channel_multiple (default 1: what the plan removes)")
    _bench.add_options(parser)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.threads, args.row, args.channel_multiple)
        return
    _bench.quick(args, models=",".join(QUICK))
    _bench.started("bench_zoo", args, "capture, trim, save and export across timm models")
    names = args.models.split(",") if args.models else list(MODELS)
    start = time.perf_counter()
    rows: dict[str, dict] = {}
    json_path = _bench.output_dir(args, "bench_zoo") / "bench_zoo.json"

    def write() -> list[dict]:  # after every row, so that an interrupted run keeps its rows
        ordered = [rows[name] for name in names if name in rows]
        json_path.write_text(json.dumps({"thresholds": THRESHOLDS, "threads": args.threads,
                                        "channel_multiple": args.channel_multiple,
                                        "jobs": args.jobs,
                                        "wall_seconds": round(time.perf_counter() - start, 1),
                                        "rows": ordered}, indent=1) + "\n")
        return ordered

    with ThreadPoolExecutor(args.jobs) as pool, tqdm(total=len(names), unit="model") as bar:
        futures = {pool.submit(spawn, name, args.threads, args.timeout, args.channel_multiple):
                   name for name in names}
        for future in as_completed(futures):
            row = future.result()
            rows[row["model"]] = row
            write()
            bar.set_postfix_str(f"{row['model']} {row.get('total_seconds', '?')} s")
            bar.update()
    ordered = write()
    print(table(ordered))
    print(f"\n{len(ordered)} models in {time.perf_counter() - start:.0f} s; "
          f"T = {' / '.join(map(str, THRESHOLDS))}; JSON: {json_path}")


if __name__ == "__main__":
    main()
