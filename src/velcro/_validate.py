"""Reading files that may be hostile: one mechanism for every loader.

Every file velcro reads (plans, statistics, splits, trimmed models, sweeps, search summaries,
weights) is untrusted until checked. Loaders use the pieces here so that each check is made
the same way everywhere and every failure is one :class:`VelcroError` naming the file and
the field:

- :func:`read_json` / :func:`parse_json`: size and nesting bounds, no NaN/Infinity, no
  duplicate keys, no integers of absurd length.
- :class:`Fields`: typed field readers (``fields.integer(doc, "count", low=0)``), each error
  naming the field by its path in the document (``sites[3].threshold``).
- :func:`check_finite`: NaN/Inf in a float tensor, naming the first offending element.
- :func:`write_pair` / :func:`read_pair`: a JSON document and its safetensors file written
  as a pair that cannot mix: the JSON records the SHA-256 of the tensor file's bytes, and the
  reader refuses a tensor file whose bytes do not match.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from velcro._io import atomic_group, atomic_path
from velcro.errors import VelcroError

# Bounds on what a file may declare; larger is refused before any work.
MAX_JSON_BYTES = 64 * 2**20  # parsed, such a file takes at most a few hundred MiB
MAX_SPLIT_BYTES = 256 * 2**20  # a split of every ImageNet training image is ~70 MiB
MAX_JSON_DEPTH = 64  # velcro writes at most ~10 levels
MAX_INT_DIGITS = 40  # integers beyond 10**40 are never counts or shapes
MAX_DIMS = 16  # dimensions of a declared tensor shape
MAX_NAME = 512  # characters of a site, module or set name

_REQUIRED = object()
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)


def _one_line(text: object, limit: int = 80) -> str:
    text = re.sub(r"\s+", " ", str(text)).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _printable(text: str, limit: int = 120) -> str:
    """A field path from a file, safe for a one-line message (escapes, bounded length)."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def show(value: object) -> str:
    """A short, one-line rendering of a value from a file, for error messages."""
    return _one_line(repr(value), 60)


class Fields:
    """Typed readers of the fields of one file's document; errors name file and field.

    Args:
        path: the file (named in every error).
        what: what the file should be, e.g. ``"plan"``.
        fix: what the user should do, e.g. ``"make it again with `velcro compress`"``.

    Example:
        >>> fields = Fields(path, "plan", "make it again with `velcro compress`")
        >>> rows = fields.list(document, "sites")
        >>> threshold = fields.number(rows[0], "threshold", "sites[0]", low=0, high=1)
    """

    def __init__(self, path: str | Path, what: str, fix: str) -> None:
        self.path = Path(path)
        self.what = what
        self.fix = fix

    def error(self, field: str, problem: str) -> VelcroError:
        """The error for ``field`` (a path like ``sites[2].units``; "" for the whole file)."""
        place = f": field '{_printable(field)}'" if field else ""
        return VelcroError(f"{self.what} '{self.path}'{place} {problem}; {self.fix}")

    def foreign(self, problem: str) -> VelcroError:
        """The error for a file that is not of this kind at all."""
        return VelcroError(f"'{self.path}' is not a velcro {self.what} ({problem}); {self.fix}")

    def document(self, value: object, formats: tuple[str, ...]) -> dict:
        """``value`` checked to be a JSON object whose ``format`` is one of ``formats``."""
        if not isinstance(value, dict):
            raise self.foreign(f"it holds a JSON {type(value).__name__}, not an object")
        fmt = value.get("format")
        if fmt not in formats:
            raise self.foreign(f"its format is {show(fmt)}, not {' or '.join(formats)}")
        return value

    @staticmethod
    def join(where: str, key: str | int) -> str:
        if isinstance(key, int):
            return f"{where}[{key}]"
        return f"{where}.{key}" if where else key

    def get(self, obj: object, key: str, kind: type | tuple[type, ...], where: str = "",
            default: object = _REQUIRED) -> object:
        """``obj[key]`` checked to be of ``kind`` (a bool is never an int or a float)."""
        if not isinstance(obj, dict):
            raise self.error(where, f"must be a JSON object, not {type(obj).__name__}")
        field = self.join(where, key)
        if key not in obj:
            if default is _REQUIRED:
                raise self.error(field, "is missing")
            return default
        value = obj[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            names = "a number" if set(kinds) == {int, float} else " or ".join(
                _kind_name(k) for k in kinds)
            raise self.error(field, f"must be {names}, not {show(value)}")
        return value

    def dict(self, obj: object, key: str, where: str = "", default: object = _REQUIRED) -> dict:
        return self.get(obj, key, dict, where, default)  # type: ignore[return-value]

    def list(self, obj: object, key: str, where: str = "", default: object = _REQUIRED,
             max_len: int | None = None) -> list:
        value = self.get(obj, key, list, where, default)
        if max_len is not None and isinstance(value, list) and len(value) > max_len:
            raise self.error(self.join(where, key), f"has {len(value)} entries, more than "
                             f"the {max_len} allowed")
        return value  # type: ignore[return-value]

    def string(self, obj: object, key: str, where: str = "", default: object = _REQUIRED,
               choices: tuple[str, ...] | None = None, max_len: int = MAX_NAME) -> str:
        value = self.get(obj, key, str, where, default)
        field = self.join(where, key)
        if isinstance(value, str):
            if choices is not None and value not in choices:
                raise self.error(field, f"is {show(value)}, not one of {', '.join(choices)}")
            if len(value) > max_len:
                raise self.error(field, f"is {len(value)} characters long (at most {max_len})")
        return value  # type: ignore[return-value]

    def integer(self, obj: object, key: str, where: str = "", default: object = _REQUIRED,
                low: int | None = None, high: int | None = None) -> int:
        value = self.get(obj, key, int, where, default)
        if isinstance(value, int) and not isinstance(value, bool):
            self.check_range(value, self.join(where, key), low, high)
        return value  # type: ignore[return-value]

    def number(self, obj: object, key: str, where: str = "", default: object = _REQUIRED,
               low: float | None = None, high: float | None = None) -> float:
        """A finite int or float (returned as a float) within ``[low, high]``."""
        value = self.get(obj, key, (int, float), where, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return value  # type: ignore[return-value]  # the default
        field = self.join(where, key)
        if not math.isfinite(value):
            raise self.error(field, f"is {value}, not a finite number")
        self.check_range(value, field, low, high)
        return float(value)

    def optional(self, reader: Callable[..., object], obj: object, key: str, where: str = "",
                 **bounds: object) -> object:
        """``reader(obj, key, ...)`` unless the field is absent or null (then None)."""
        if isinstance(obj, dict) and obj.get(key) is None:
            return None
        return reader(obj, key, where, **bounds)

    def check_range(self, value: float, field: str, low: float | None,
                    high: float | None) -> None:
        if low is not None and value < low or high is not None and value > high:
            span = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
            raise self.error(field, f"is {show(value)}, outside {span}")

    def shape(self, obj: object, key: str, where: str = "") -> tuple[int, ...]:
        """A tensor shape: a list of at most MAX_DIMS non-negative integers."""
        values = self.list(obj, key, where, max_len=MAX_DIMS)
        field = self.join(where, key)
        for value in values:
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**40:
                raise self.error(field, f"must list sizes (non-negative integers), not "
                                 f"{show(values)}")
        return tuple(values)

    def unique_names(self, names: list[str], field: str) -> None:
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise self.error(field, f"names {show(name)} twice")
            seen.add(name)


def _kind_name(kind: type) -> str:
    return {dict: "an object", list: "a list", str: "a string", int: "an integer",
            float: "a number", bool: "true or false", type(None): "null"}.get(
        kind, kind.__name__)


def _duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"key {show(duplicate)} appears twice in one object")
    return result


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} overflows a float")
    return value


def _no_constant(text: str) -> float:
    raise ValueError(f"{text} is not a number JSON allows")


def _depth(text: str) -> int:
    """The deepest nesting of [ and { outside strings (without recursion)."""
    import numpy as np

    stripped = _STRING.sub('""', text).encode("utf-8", "replace")
    codes = np.frombuffer(stripped, dtype=np.uint8)
    opens = (codes == ord("[")) | (codes == ord("{"))
    closes = (codes == ord("]")) | (codes == ord("}"))
    steps = opens.astype(np.int64) - closes.astype(np.int64)
    return int(np.cumsum(steps).max()) if steps.size else 0


def parse_json(text: str, fields: Fields, field: str = "",
               max_depth: int = MAX_JSON_DEPTH) -> object:
    """Parse ``text`` (untrusted JSON) within the nesting bound; strict numbers and keys."""
    def fail(problem: str) -> VelcroError:
        return fields.error(field, f"is not {problem}") if field else fields.foreign(problem)

    if _depth(text) > max_depth:
        raise fail(f"JSON nested at most {max_depth} levels deep")
    try:
        return json.loads(text, object_pairs_hook=_duplicate_keys, parse_int=_bounded_int,
                          parse_float=_finite_float, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise fail(f"valid JSON: line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except (ValueError, RecursionError) as exc:
        raise fail(f"valid JSON: {_one_line(exc)}") from None


def read_json(path: str | Path, fields: Fields, max_bytes: int = MAX_JSON_BYTES,
              max_depth: int = MAX_JSON_DEPTH) -> object:
    """Read and parse ``path`` as untrusted JSON (at most ``max_bytes``, UTF-8)."""
    path = Path(path)
    if not path.is_file():
        raise fields.error("", "does not exist or is not a regular file")
    try:
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise fields.error("", f"cannot be read ({exc.strerror or exc})") from None
    if len(data) > max_bytes:
        raise fields.foreign(f"larger than the {max_bytes // 2**20} MiB a velcro file may be")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise fields.foreign(f"not UTF-8 text: byte {exc.start}") from None
    return parse_json(text, fields, "", max_depth)


def check_finite(tensor: torch.Tensor, fields: Fields, field: str) -> None:
    """Refuse NaN or Inf in a floating-point (or complex) tensor, naming the first one."""
    if not (tensor.is_floating_point() or tensor.is_complex()) or tensor.numel() == 0:
        return
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return
    flat = int((~finite).flatten().nonzero()[0])
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), tensor.shape))
    value = tensor.flatten()[flat].item()
    raise fields.error(field, f"holds {value} at index {list(index)} (NaN or infinite "
                       "values are never valid here)")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def plain_file_name(name: object) -> bool:
    """A file name in the same folder: no separators, not ``.``/``..``, printable."""
    return (isinstance(name, str) and 0 < len(name) <= 255 and "/" not in name
            and "\\" not in name and name not in (".", "..") and name.isprintable())


def tensor_file(json_path: Path) -> Path:
    """Where the tensors of a two-file output go: beside the JSON, ``.safetensors`` added."""
    return json_path.with_name(json_path.name + ".safetensors")


def write_pair(json_path: str | Path, tensors: Mapping[str, torch.Tensor],
               tensor_metadata: dict[str, str], document: dict,
               render: Callable[[dict], str]) -> None:
    """Write ``document`` (JSON) and ``tensors`` (safetensors beside it) as a pair.

    The JSON records the tensor file's name (``tensors``) and the SHA-256 of its bytes
    (``tensors_sha256``). Both files are written to temporary names first; only when both
    are complete are they renamed into place, as one :func:`~velcro._io.atomic_group` (a
    failed second rename puts the first file back). A process killed between the two renames
    leaves a pair whose checksum does not match (refused by :func:`read_pair`), never a mixed
    pair that loads.
    """
    from safetensors.torch import save

    json_path = Path(json_path)
    target = tensor_file(json_path)
    data = save(dict(tensors), metadata=tensor_metadata)
    document = {**document, "tensors": target.name, "tensors_sha256": sha256_bytes(data)}
    text = render(document)
    with atomic_group(), atomic_path(target) as tensor_tmp:  # both files, or neither
        tensor_tmp.write_bytes(data)
        with atomic_path(json_path) as json_tmp:
            json_tmp.write_text(text, encoding="utf-8")


def read_pair(json_path: str | Path, document: dict, fields: Fields) -> dict[str, torch.Tensor]:
    """The tensors of a pair written by :func:`write_pair`, after checking their SHA-256.

    The tensor file is read once (its bytes are hashed and then parsed, so it cannot change
    in between); memory is bounded by the file's own size.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    json_path = Path(json_path)
    name = fields.string(document, "tensors")
    if not plain_file_name(name):
        raise fields.error("tensors", f"must be a file name beside the JSON, not {show(name)}")
    digest = fields.string(document, "tensors_sha256")
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise fields.error("tensors_sha256", f"is not a SHA-256 digest: {show(digest)}")
    path = json_path.parent / name
    if not path.is_file():  # missing, or a FIFO or device that reading would hang on
        raise fields.error("tensors", f"names '{path}', which does not exist or is not a "
                           "regular file; keep the .safetensors file beside the JSON")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise fields.error("tensors", f"names '{path}', which cannot be read "
                           f"({exc.strerror or exc}); keep the .safetensors file beside the "
                           "JSON") from None
    if sha256_bytes(data) != digest:
        raise fields.error("tensors_sha256", f"does not match '{path}': the JSON and the "
                           "tensors come from different saves (an interrupted or mixed copy)")
    try:
        return load(data)
    except (SafetensorError, ValueError, RuntimeError, TypeError) as exc:
        raise fields.error("tensors", f"names '{path}', which is not a readable safetensors "
                           f"file ({_one_line(exc)})") from None


def load_safetensors(path: Path, fields: Fields) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a single safetensors file; memory bounded by its size."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        raise fields.error("", "does not exist or is not a regular file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        raise fields.error("", f"is not a readable safetensors file ({_one_line(exc)})") from None
    return metadata, tensors
