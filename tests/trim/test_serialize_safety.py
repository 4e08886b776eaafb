"""A trimmed-model file can run no code and allocate nothing beyond its tensor file.

torch.fx turns a graph into Python source; every crafted string below would reach that source
(or an import, or an allocation) if the loader trusted the file. Each case checks that
nothing ran (a marker file is not created), that the loader raised a one-line VelcroError
naming the file and the field, and that the folder is left as it was.
"""

import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from hostile import assert_refused, edit_json, edit_tensors, nested
from zoo import build, images

import velcro
from velcro.cli import main


@pytest.fixture(scope="module")
def chain_model():
    model, shape = build("chain")
    stats = velcro.calibrate(model, images(shape, 8), progress=False)
    return velcro.trim(model, velcro.plan(stats, 0.5, granularity="channel")), shape


@pytest.fixture
def saved(tmp_path, chain_model):
    path = tmp_path / "model" / "small.json"
    path.parent.mkdir()
    velcro.save_trimmed(chain_model[0], path)
    return path


def code(marker):
    """Python that creates ``marker`` when run: the proof that a file's text was executed."""
    return f"__import__('pathlib').Path({str(marker)!r}).touch()"


def node(document, name):
    return next(n for n in document["nodes"] if n["name"] == name)


def index(document, name):
    return next(i for i, n in enumerate(document["nodes"]) if n["name"] == name)


def rename_module(document, old, new):
    document["modules"][new] = document["modules"].pop(old)
    node(document, old)["target"] = new


def attacks(marker):
    """case -> (edit of the JSON document, the field the error must name)."""
    run = code(marker)
    return {
        "placeholder target with a default that runs code": (
            lambda d: node(d, "x").__setitem__("target", f"x={run}"), "nodes[0].target"),
        "keyword name that runs code": (
            lambda d: node(d, "relu").__setitem__("kwargs", {"dict": {f"inplace={run}, z": 1}}),
            "kwargs.inplace="),
        "module path with a quote": (
            lambda d: rename_module(d, "act1", f'act1")or {run}#'), "modules.act1\")or"),
        "node name with a newline": (
            lambda d: node(d, "conv1").__setitem__("name", f"conv1\n{run}"), "nodes[1].name"),
        "dunder module path": (lambda d: rename_module(d, "act1", "__class__"),
                               "modules.__class__"),
        "module path through __dict__": (lambda d: rename_module(d, "act1", "act1.__dict__"),
                                         "modules.act1.__dict__"),
        "module name an nn.Module already has": (lambda d: rename_module(d, "act1", "forward"),
                                                 "modules.forward"),
        "method named __class__": (
            lambda d: node(d, "flatten").__setitem__("target", "__class__"), "nodes[8].target"),
        "method outside the allow-list": (
            lambda d: node(d, "flatten").__setitem__("target", "register_hook"),
            "nodes[8].target"),
        "function eval": (
            lambda d: node(d, "relu").__setitem__("target", "builtins.eval"), "nodes[10].target"),
        "function os.system": (
            lambda d: node(d, "relu").__setitem__("target", "os.system"), "nodes[10].target"),
        "function torch.load": (
            lambda d: node(d, "relu").__setitem__("target", "torch.load"), "nodes[10].target"),
        "function torch.manual_seed": (
            lambda d: node(d, "relu").__setitem__("target", "torch.manual_seed"),
            "nodes[10].target"),
        "function Tensor.apply_ (takes a callable)": (
            lambda d: node(d, "relu").__setitem__("target", "torch.Tensor.apply_"),
            "nodes[10].target"),
        "getattr of __class__": (
            lambda d: node(d, "relu").update(target="builtins.getattr", args={
                "tuple": [{"node": "fc1"}, "__class__"]}), "nodes[10].args"),
        "get_attr of __globals__": (
            lambda d: node(d, "relu").update(op="get_attr", target="fc1.__init__.__globals__",
                                             args={"tuple": []}), "nodes[10].target"),
        "module type Sequential": (
            lambda d: d["modules"]["act1"].__setitem__("type", "Sequential"), "modules.act1.type"),
        "module type outside torch.nn": (
            lambda d: d["modules"]["act1"].__setitem__("type", "Popen"), "modules.act1.type"),
        "constructor argument that is not one": (
            lambda d: d["modules"]["act1"]["config"].__setitem__("__init__", run),
            "modules.act1.config.__init__"),
        "dtype that is not one": (
            lambda d: node(d, "relu")["args"]["tuple"].append({"dtype": "__builtins__"}),
            "nodes[10].args"),
        "device that is not one": (
            lambda d: node(d, "relu")["args"]["tuple"].append({"device": f"cpu\n{run}"}),
            "nodes[10].args"),
        "a tag velcro never writes": (
            lambda d: node(d, "relu")["args"]["tuple"].append({"code": run}), "nodes[10].args"),
        "class name with code": (
            lambda d: d.__setitem__("class_name", f"X(object): pass\n{run}\nclass Y"),
            "class_name"),
        "placeholder with a default value": (
            lambda d: node(d, "x").__setitem__("args", {"tuple": [{"float": "nan"}]}),
            "nodes[0].args"),
        "reference to a later node": (
            lambda d: node(d, "conv1").__setitem__("args", {"tuple": [{"node": "fc2"}]}),
            "nodes[1].args"),
        "no output node": (lambda d: d["nodes"].pop(), "nodes"),
        "a module no node calls": (
            lambda d: d["modules"].__setitem__("spare", {"type": "ReLU", "config": {}}),
            "modules.spare"),
        "a 12 GiB attribute no node reads": (
            lambda d: d["attributes"].__setitem__("huge", {"shape": [3, 2**30], "dtype":
                                                           "float32"}), "attributes.huge"),
        "previous format without a checksum": (
            lambda d: d.__setitem__("format", "velcro.trimmed/1"), "format"),
        "checksum edited": (lambda d: d.__setitem__("tensors_sha256", "f" * 64),
                            "tensors_sha256"),
        "tensors outside the folder": (
            lambda d: d.__setitem__("tensors", "../../etc/x.safetensors"), "tensors"),
    }


CASES = sorted(attacks("marker"))


@pytest.mark.parametrize("case", CASES)
def test_a_crafted_file_runs_nothing_and_is_refused_naming_the_field(saved, tmp_path, case):
    marker = tmp_path / "PWNED"
    change, field = attacks(marker)[case]
    edit_json(saved, change)
    assert_refused(lambda: velcro.load_trimmed(saved), saved, field)
    assert not marker.exists(), "code from the file ran"


def test_velcro_inspect_of_a_crafted_file_runs_nothing(saved, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    edit_json(saved, attacks(marker)["placeholder target with a default that runs code"][0])
    assert main(["inspect", str(saved)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(saved) in err and "nodes[0].target" in err
    assert not marker.exists()


def test_a_quoted_string_argument_stays_a_string(saved, tmp_path):
    """Strings are values (timm's assert messages hold quotes): they load as literals and
    never become code, even when the model runs."""
    marker = tmp_path / "PWNED"
    payload = f"'); {code(marker)} #\"\n"
    edit_json(saved, lambda d: node(d, "relu").__setitem__("args", {"tuple": [
        {"node": "fc1"}]}) or node(d, "relu").__setitem__("kwargs", {"dict": {}}))
    edit_json(saved, lambda d: d["nodes"].insert(index(d, "relu"), {
        "name": "message", "op": "call_function", "target": "torch._assert",
        "args": {"tuple": [True, payload]}, "kwargs": {"dict": {}}}))
    small = velcro.load_trimmed(saved)
    call = next(n for n in small.graph.nodes if n.name == "message")
    assert call.target is torch._assert and call.args == (True, payload)
    small(torch.zeros(1, 3, 12, 12))
    assert not marker.exists()


TENSOR_EDITS = {
    "NaN weight": (lambda t: t["conv1.weight"].view(-1).__setitem__(0, float("nan")),
                   "tensors.conv1.weight"),
    "a tensor the graph does not use": (
        lambda t: t.__setitem__("spare.weight", torch.zeros(3)), "tensors"),
    "a weight of another shape": (
        lambda t: t.__setitem__("fc2.weight", torch.zeros(5, 11)), "tensors.fc2.weight"),
    "a weight missing": (lambda t: t.pop("fc1.bias"), "fc1.bias"),
}


@pytest.mark.parametrize("case", sorted(TENSOR_EDITS))
def test_edited_tensors_are_refused_naming_the_tensor(saved, case):
    change, field = TENSOR_EDITS[case]
    edit_tensors(saved, change)
    assert_refused(lambda: velcro.load_trimmed(saved), saved, field)


def test_tensors_of_another_save_are_refused(saved, tmp_path, chain_model):
    other = tmp_path / "other.json"
    small, shape = chain_model
    with torch.no_grad():
        small.fc2.bias += 1.0
    try:
        velcro.save_trimmed(small, other)
    finally:
        with torch.no_grad():
            small.fc2.bias -= 1.0
    shutil.copy(other.with_name("other.json.safetensors"),
                saved.with_name("small.json.safetensors"))
    assert_refused(lambda: velcro.load_trimmed(saved), saved, "tensors_sha256",
                   "different saves")


def test_deep_nesting_is_refused_not_a_recursion_error(saved):
    text = saved.read_text()
    saved.write_text(text.replace('"sites": {', '"deep": ' + nested(200_000) + ', "sites": {'))
    assert_refused(lambda: velcro.load_trimmed(saved), saved, "nested")


ALLOCATE = textwrap.dedent("""
    import resource, sys
    import velcro

    def virtual_bytes():
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024

    limit = virtual_bytes() + 2 * 2**30  # the process may grow by 2 GiB, no more
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        velcro.load_trimmed(sys.argv[1])
    except velcro.VelcroError as exc:
        print("VelcroError:", exc)
        sys.exit(0)
    except BaseException as exc:
        print("other:", type(exc).__name__, str(exc)[:200])
        sys.exit(3)
    sys.exit(4)
""")


def declare_huge(document):
    """A 12 GiB float32 attribute that a node reads, and a 12 GiB bias map."""
    document["attributes"]["huge"] = {"shape": [3, 2**30], "dtype": "float32"}
    document["nodes"].insert(1, {"name": "huge", "op": "get_attr", "target": "huge",
                                 "args": {"tuple": []}, "kwargs": {"dict": {}}})
    document["modules"]["conv2"]["bias_map"] = [12, 2**28]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_declared_tensors_are_never_allocated_beyond_the_tensor_file(saved):
    edit_json(saved, declare_huge)
    result = subprocess.run([sys.executable, "-c", ALLOCATE, str(saved)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    # refused for what the file holds, not because an allocation was tried and failed
    assert str(saved) in result.stdout and "holds no tensor 'huge'" in result.stdout
    assert "allocat" not in result.stdout.lower(), result.stdout
