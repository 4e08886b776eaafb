"""Calibration and evaluation across processes (velcro.distributed).

One test launches two processes on loopback with torchrun (gloo) and runs this file as the
worker (``__main__`` below): the API on generated data (lists of batches, loaders with an
uneven last shard, a rank with no image, a shuffled loader, errors on one rank), then the
`velcro` command line, unchanged. The other tests check the pieces in this process.

The reference is a single process over the same batches. Shards are whole batches, so each
image goes through the model in the same batch as in the reference and its activations are
bit for bit the same (a float32 convolution's result may change with the batch's other
images; with whole batches that cannot happen). Both sides run one thread per process so
the kernels choose the same blocking. What remains is the order of the float64 merges:
per-rank Welford then Chan across ranks, against one Welford over all images, which agrees
to about 1e-16 relative; the test allows 1e-9.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_workspace import DATA_OPTIONS
from cli_workspace import build as build_workspace
from torch.utils.data import DataLoader, Dataset, TensorDataset
from zoo import build, images

import velcro
from velcro import distributed
from velcro.distributed._shard import Shard, first_images
from velcro.errors import VelcroError
from velcro.search import SearchSchedule

RELATIVE = 1e-9
TORCHRUN_SECONDS = 120


class Indexed(Dataset):
    """Images whose label is their index, to see which images each rank evaluated."""

    def __init__(self, count: int, shape: tuple[int, ...]) -> None:
        self.x = torch.randn(count, *shape, generator=torch.Generator().manual_seed(3))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int):
        return self.x[index], index


def scenarios():
    """name -> (model, data, keyword arguments); the same on every rank and in the parent."""
    residual, shape_r = build("residual")
    chain, shape_c = build("chain", seed=1)
    gen = torch.Generator().manual_seed(2)
    x13, y13 = torch.randn(13, *shape_c, generator=gen), torch.randint(0, 5, (13,), generator=gen)
    labelled13 = TensorDataset(x13, y13)
    return {
        # 6 batches (4,4,4,4,4,1): rank 0 gets 12 images, rank 1 gets 9
        "list": (residual, images(shape_r, 21, seed=4, batch=4), {}),
        # cut inside batch 4: rank 0 gets 4+4+2, rank 1 gets 4+4
        "list_max": (residual, images(shape_r, 21, seed=4, batch=4), {"max_images": 18}),
        # a map-style loader, 4 batches (4,4,4,1): rank 0 gets 8 images, rank 1 gets 5
        "loader": (chain, DataLoader(labelled13, batch_size=4), {}),
        "loader_max": (chain, DataLoader(labelled13, batch_size=4), {"max_images": 6}),
        # one batch: rank 1 has no image at all
        "one_batch": (chain, DataLoader(labelled13, batch_size=16), {}),
        # channel co-moments: uneven shards, and a rank with no image
        "covariance_list": (residual, images(shape_r, 21, seed=4, batch=4),
                            {"covariance": True}),
        "covariance_one_batch": (chain, [x13], {"covariance": True}),
    }


def search_task(stats_path: Path):
    """A search on 5 batches (8,8,8,8,6): rank 0 runs 3 of them, rank 1 runs 2."""
    model, shape = build("chain", seed=1)
    x = torch.randn(38, *shape, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        labels = model(x).argmax(1)
    labels[::5] = (labels[::5] + 1) % 5  # some wrong, so that accuracy can move both ways
    batches = [(x[i : i + 8], labels[i : i + 8]) for i in range(0, 38, 8)]
    return model, velcro.Stats.load(stats_path), batches


def run_search(stats_path: Path) -> dict:
    model, stats, batches = search_task(stats_path)
    # the guard and the nested check too: the check images are split off the same way on
    # every rank, and each rank runs its share of their batches
    result = velcro.search(model, stats, batches, granularity="channel", criterion="accuracy",
                           tolerance=0.05, confidence=None, check_fraction=0.25,
                           schedule=SearchSchedule(levels=3, refine_rounds=1), progress=False)
    return {"thresholds": result.thresholds, "evaluations": result.evaluations,
            "accuracy": result.search_accuracy, "images": result.search_images,
            "trajectory": [(row["accuracy"], row["loss"], row["agreement"], row["kl"])
                           for row in result.trajectory],
            "check": [(row["accuracy"], row["agreement"], row["passed"])
                      for row in result.check["path"]],
            "check_images": result.check["images"]}


def cli_commands(workspace: Path, out: Path) -> list[list[str]]:
    """`velcro calibrate` then `velcro evaluate` on the generated image task, into ``out``."""
    data = [o for o in DATA_OPTIONS if o != "-q"]  # keep the progress bars, to count them
    model = ["--model", "clitiny:factory", "--weights", str(workspace / "tiny.safetensors")]
    return [
        ["calibrate", str(workspace / "data"), *model, "--calibration-fraction", "0.5",
         *data, "-o", str(out / "cli.stats.safetensors")],
        ["evaluate", "--split", str(out / "cli.stats.split.json"), *model, *data,
         "-o", str(out / "cli.eval.json")],
    ]


def worker(out: Path, workspace: Path) -> None:
    """Run on each rank under torchrun: every result goes to a file for the parent to check."""
    import torch.distributed as dist

    (out / f"pid{os.environ['RANK']}").write_text(str(os.getpid()))
    results: dict = {"reports": {}, "errors": {}}
    for name, (model, data, options) in scenarios().items():
        stats = velcro.calibrate(model, data, progress=False, **options)  # default group
        rank = distributed.rank()
        stats.save(out / f"{name}.rank{rank}.safetensors")
        if isinstance(data, DataLoader):
            report = velcro.evaluate(model, data, task_classes=[0, 2, 3], progress=False,
                                     **options)
            results["reports"][name] = [report.hits, report.labels, report.task_hits]
    results["rank"], results["world"] = distributed.rank(), distributed.world_size()
    results["is_main"] = distributed.is_main()

    model, data, _ = scenarios()["loader"]
    explicit = dist.new_group(backend="gloo")
    stats = velcro.calibrate(model, data, progress=False, group=explicit)
    stats.save(out / f"explicit.rank{rank}.safetensors")

    # rank 0 draws its own shuffle; every rank must follow it, each image evaluated once
    torch.manual_seed(100 + rank)
    indexed = Indexed(11, (3, 12, 12))
    report = velcro.evaluate(model, DataLoader(indexed, batch_size=3, shuffle=True),
                             progress=False)
    results["reports"]["shuffled"] = [report.hits, report.labels, None]

    broken = images((3, 12, 12), 12, seed=5, batch=4)
    broken[1][0, 0, 0, 0] = float("nan")  # batch 1 belongs to rank 1
    for case, call in {
        "nan_on_rank1": lambda: velcro.calibrate(model, broken, progress=False),
        "other_weights": lambda: velcro.calibrate(build("chain", seed=rank)[0], data,
                                                  progress=False),
        "presharded": lambda: velcro.calibrate(
            model, DataLoader(indexed, sampler=distributed.ShardSampler(indexed)),
            progress=False),
    }.items():
        try:
            call()
            results["errors"][case] = None
        except VelcroError as exc:
            results["errors"][case] = str(exc)
    results["search"] = run_search(workspace / "search.stats.safetensors")
    torch.save(results, out / f"results.rank{rank}.pt")
    run_cli(workspace, out, rank)


def run_cli(workspace: Path, out: Path, rank: int) -> None:
    """The command line, unchanged, under torchrun: record each rank's output and writes."""
    import torch.distributed as dist

    from velcro.cli import main

    sys.path.insert(0, str(workspace / "modules"))
    writes, replace = [], os.replace

    def recording_replace(source, target, *args, **kwargs):
        writes.append(Path(target).name)
        return replace(source, target, *args, **kwargs)

    codes = []
    with open(out / f"stdout.rank{rank}", "w") as stdout, \
            open(out / f"stderr.rank{rank}", "w") as stderr, \
            contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        os.replace = recording_replace
        try:
            for command in cli_commands(workspace, out):
                codes.append(main(command))
                dist.barrier()  # the next command reads what rank 0 wrote
        finally:
            os.replace = replace
    (out / f"cli.rank{rank}.json").write_text(json.dumps({"codes": codes, "writes": writes}))


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_torchrun(out: Path, workspace: Path) -> None:
    """Two workers on loopback; fails on a non-zero exit, a timeout or a worker left alive."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # the workers import the tests' shared helpers (zoo, cli_workspace) from tests/
    helpers = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [helpers, env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", __file__, str(out), str(workspace)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = process.communicate(timeout=TORCHRUN_SECONDS)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)  # torchrun stops its workers on SIGTERM
        try:
            output, _ = process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        output = f"torchrun timed out after {TORCHRUN_SECONDS} s\n{output}"
    finally:
        leftovers = _kill_workers(out)
    assert not leftovers, f"worker processes {leftovers} outlived torchrun"
    assert process.returncode == 0, output[-4000:]


def _kill_workers(out: Path) -> list[int]:
    """Kill (by pid) any worker still alive; return the pids that were."""
    alive = []
    for pid_file in out.glob("pid*"):
        pid = int(pid_file.read_text())
        for _ in range(50):  # torchrun may still be reaping it
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            alive.append(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return alive


def assert_stats_close(merged: velcro.Stats, reference: velcro.Stats) -> None:
    assert merged.names == reference.names
    assert merged.structure == reference.structure and merged.weights == reference.weights
    for name in reference.names:
        got, want = merged[name], reference[name]
        assert got.count == want.count, name
        assert (got.comoment is None) == (want.comoment is None), name
        pairs = [(got.mean, want.mean), (got.m2, want.m2)]
        if want.comoment is not None:
            pairs.append((got.comoment, want.comoment))
        for a, b in pairs:
            scale = float(b.abs().max())
            # relative to each element, and to the site's scale where an element is ~0
            error = (a - b).abs() / torch.maximum(b.abs(), torch.tensor(scale * 1e-3))
            assert float(error.max()) <= RELATIVE, (name, float(error.max()))


def test_two_processes_match_one(tmp_path, monkeypatch):
    workspace = build_workspace(tmp_path / "workspace").root
    model, shape = build("chain", seed=1)
    velcro.calibrate(model, images(shape, 24, seed=7), progress=False).save(
        workspace / "search.stats.safetensors")
    out = tmp_path / "out"
    out.mkdir()
    run_torchrun(out, workspace)
    check_api(out)
    check_search(out, workspace)
    check_cli(out, workspace, tmp_path, monkeypatch)


def check_api(tmp_path: Path) -> None:
    ranks = [torch.load(tmp_path / f"results.rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [(r["rank"], r["world"], r["is_main"]) for r in ranks] == [(0, 2, True),
                                                                     (1, 2, False)]
    with one_thread():
        for name, (model, data, options) in scenarios().items():
            merged = [velcro.Stats.load(tmp_path / f"{name}.rank{r}.safetensors")
                      for r in (0, 1)]
            for a, b in zip(merged[0].sites.values(), merged[1].sites.values(), strict=True):
                assert a.count == b.count  # every rank ends with the very same bits
                assert torch.equal(a.mean, b.mean) and torch.equal(a.m2, b.m2)
                assert (a.comoment is None) == ("covariance" not in options)
                if a.comoment is not None:
                    assert torch.equal(a.comoment, b.comoment)
            reference = velcro.calibrate(model, data, progress=False, **options)
            assert merged[0].count == reference.count == options.get("max_images", 21 if
                                                                     "list" in name else 13)
            assert_stats_close(merged[0], reference)
            if isinstance(data, DataLoader):
                want = velcro.evaluate(model, data, task_classes=[0, 2, 3], progress=False,
                                       **options)
                for r in ranks:
                    hits, labels, task_hits = r["reports"][name]
                    assert torch.equal(hits, want.hits) and torch.equal(labels, want.labels)
                    assert torch.equal(task_hits, want.task_hits)
        model, data, _ = scenarios()["loader"]
        assert_stats_close(velcro.Stats.load(tmp_path / "explicit.rank1.safetensors"),
                           velcro.calibrate(model, data, progress=False))
    shuffled = [r["reports"]["shuffled"][1] for r in ranks]
    assert torch.equal(shuffled[0], shuffled[1])
    assert sorted(shuffled[0].tolist()) == list(range(11))  # each image once, none padded
    errors = [r["errors"] for r in ranks]
    assert "NaN" in errors[1]["nan_on_rank1"]
    assert "rank 1 failed" in errors[0]["nan_on_rank1"] and "NaN" in errors[0]["nan_on_rank1"]
    for e in errors:
        assert "other weights" in e["other_weights"]
        assert "ShardSampler" in e["presharded"]


def check_search(out: Path, workspace: Path) -> None:
    """The same search steps and outcomes on both ranks as in one process, bit for bit."""
    ranks = [torch.load(out / f"results.rank{r}.pt", weights_only=True)["search"]
             for r in (0, 1)]
    with one_thread():
        alone = run_search(workspace / "search.stats.safetensors")
    assert alone["images"] + alone["check_images"] == 38 and alone["evaluations"] > 5
    assert alone["check"]  # the check ran on the held-back images
    for got in ranks:
        assert got == alone


def check_cli(out: Path, workspace: Path, tmp_path: Path, monkeypatch) -> None:
    """Same files as one process, written by rank 0 alone; one summary, one progress bar."""
    ranks = [json.loads((out / f"cli.rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["codes"] == ranks[1]["codes"] == [0, 0]
    assert sorted(ranks[0]["writes"]) == ["cli.eval.json", "cli.stats.safetensors",
                                          "cli.stats.split.json"]
    assert ranks[1]["writes"] == []
    stdout = [(out / f"stdout.rank{r}").read_text() for r in (0, 1)]
    stderr = [(out / f"stderr.rank{r}").read_text() for r in (0, 1)]
    assert "calibrated Tiny" in stdout[0] and stdout[1] == ""
    assert "calibrate" in stderr[0] and "evaluate" in stderr[0]  # the progress bars
    assert "calibrate" not in stderr[1] and "evaluate" not in stderr[1]

    from velcro.cli import main

    monkeypatch.syspath_prepend(str(workspace / "modules"))
    alone = tmp_path / "alone"
    alone.mkdir()
    with one_thread(), contextlib.redirect_stderr(open(os.devnull, "w")):
        for command in cli_commands(workspace, alone):
            assert main(command) == 0
    two = velcro.Stats.load(out / "cli.stats.safetensors")
    one = velcro.Stats.load(alone / "cli.stats.safetensors")
    assert_stats_close(two, one)
    assert {**two.info, "split": None} == {**one.info, "split": None}
    assert ((out / "cli.stats.split.json").read_text()
            == (alone / "cli.stats.split.json").read_text())
    reports = [json.loads((d / "cli.eval.json").read_text()) for d in (out, alone)]
    assert reports[0]["evaluated"] == reports[1]["evaluated"]
    assert reports[0]["images"] == reports[1]["images"] == 24


@pytest.mark.parametrize("length", [0, 1, 5, 13])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_sampler_covers_each_index_once(length, world):
    shards = [list(distributed.ShardSampler(length, rank=r, world_size=world))
              for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(length))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert [len(distributed.ShardSampler(length, rank=r, world_size=world))
            for r in range(world)] == list(map(len, shards))


def test_shard_sampler_rejects_bad_rank():
    with pytest.raises(VelcroError, match="outside"):
        distributed.ShardSampler(10, rank=2, world_size=2)
    with pytest.raises(VelcroError, match="both"):
        distributed.ShardSampler(10, rank=0)


@pytest.mark.parametrize("max_images", [None, 1, 9, 10, 50])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_batch_shards_partition_the_images(world, max_images):
    data = [{"image": torch.arange(start, start + size).float(), "id": list(range(size))}
            for start, size in ((0, 4), (4, 4), (8, 3), (11, 4), (15, 1))]
    seen = []
    for rank in range(world):
        shard = Shard(data, None, None, rank, world, max_images)
        batches = list(shard)
        assert len(shard.starts) == len(batches)
        positions = distributed.batch_positions(shard.starts,
                                                [len(b["image"]) for b in batches])
        values = torch.cat([b["image"] for b in batches]) if batches else torch.zeros(0)
        assert torch.equal(values, positions.float())  # position i holds image i
        seen += positions.tolist()
    assert sorted(seen) == list(range(min(16, max_images or 16)))


def test_first_images_cuts_every_part_of_a_batch():
    batch = (torch.zeros(5, 2), [1, 2, 3, 4, 5], "name")
    cut = first_images(batch, 2)
    assert cut[0].shape == (2, 2) and cut[1] == [1, 2] and cut[2] == "name"


def test_merge_moments_matches_numpy_and_is_order_deterministic():
    rng = np.random.default_rng(0)
    values = rng.normal(3.0, 2.0, size=(23, 4, 5)) * rng.uniform(0, 1, size=(1, 4, 5))
    parts = []
    for lo, hi in ((0, 9), (9, 9), (9, 20), (20, 23)):  # one empty part
        chunk = torch.from_numpy(values[lo:hi])
        mean = chunk.mean(0) if hi > lo else torch.zeros(0, dtype=torch.float64)
        m2 = ((chunk - mean) ** 2).sum(0) if hi > lo else torch.zeros(0, dtype=torch.float64)
        parts.append((hi - lo, mean, m2))
    merged = distributed.merge_moments(parts, channel_axis=0)
    assert merged.count == 23
    np.testing.assert_allclose(merged.mean.numpy(), values.mean(0), rtol=1e-12)
    np.testing.assert_allclose(merged.variance.numpy(), values.var(0), rtol=1e-12)
    again = distributed.merge_moments(parts, channel_axis=0)
    assert torch.equal(again.mean, merged.mean) and torch.equal(again.m2, merged.m2)


def test_single_process_needs_no_group(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.process_group() is None
    assert distributed.is_main() and distributed.world_size() == 1
    data = [torch.zeros(2, 3)]
    assert distributed.shard(data) is data
    monkeypatch.setenv("RANK", "3")
    assert not distributed.is_main()  # torchrun's rank is known before any group starts


def test_rejects_a_group_that_is_not_one():
    with pytest.raises(VelcroError, match="ProcessGroup"):
        distributed.process_group("gloo")


if __name__ == "__main__":
    worker(Path(sys.argv[1]), Path(sys.argv[2]))
