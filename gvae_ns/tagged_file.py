"""Tagged, versioned files beside a run (``vae.pt``, ``densify_head.pt``, ``refinement.pt``).

Every such file is one ``torch.save`` of a dict with the same shape::

    {"format": <tag>, "version": <int>, "provenance": {...} or None, <payload keys> ...}

holding only tensors and plain python values, so it is read with ``torch.load(weights_only=True)``.
:func:`save_tagged` writes it atomically (a crash leaves the old file or none, never half of one);
:func:`load_tagged` reads it back and checks, in order: that it can be read, the format tag, the version,
the required payload keys and their types, and, when the caller says which run it expects, the
:class:`Provenance`. Every refusal is one :class:`TaggedFileError` whose message is one paragraph: the file,
what is wrong, and how to rebuild the file.

A :class:`Provenance` ties a file to the run state it was made from: the checkpoint step, the Gaussian count,
a sha256 over the lineage ids and the parameter tensors (:func:`digest_tensors`) and a sha256 over the
config (:func:`digest_config`). Two runs with the same Gaussian count but other Gaussians differ in the
digest, so a file is never matched by its count alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, Dict, Iterable, Iterator, List, Mapping, NoReturn, Optional, Tuple, Type, Union

import torch

from gvae_ns.atomic import torch_save_atomic

__all__ = [
    "TaggedFileError", "Provenance", "FileFormat", "TaggedFile", "save_tagged", "load_tagged", "digest_tensors",
    "digest_config",
]

_RESERVED = ("format", "version", "provenance")


class TaggedFileError(ValueError):
    """A tagged file that cannot be used: unreadable, foreign, of another version, malformed or made from
    another run. The message names the file, the problem and how to rebuild the file."""


# --------------------------------------------------------------------------------------------- digests
def digest_tensors(tensors: Iterable[torch.Tensor]) -> str:
    """sha256 (hex) over the dtype, shape and bytes of each tensor, in order.

    Tensors are hashed as they are on the CPU, contiguous; the dtype and shape are hashed too, so a
    reshaped or re-typed tensor with the same bytes gives another digest."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # the bytes in place, no copy
    return h.hexdigest()


def _plain(value: Any) -> Any:
    """A JSON-able, order-stable form of a config value (dataclasses, paths, types, enums, containers)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(str(_plain(v)) for v in value)
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    if isinstance(value, PurePath):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if callable(value):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__name__)}"
    return repr(value)


def digest_config(config: Any, exclude: Iterable[str] = ()) -> str:
    """sha256 (hex) of a canonical JSON form of ``config`` (a dataclass or a mapping), leaving out the
    top-level fields named in ``exclude`` (settings that do not change what the file was made from)."""
    plain = _plain(config)
    if isinstance(plain, dict):
        plain = {k: v for k, v in plain.items() if k not in set(exclude)}
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()


# ------------------------------------------------------------------------------------------ provenance
@dataclass(frozen=True)
class Provenance:
    """Which run state a file was made from."""

    step: Optional[int]
    """Checkpoint step (``None`` where it is not known)."""
    num_gaussians: int
    """Gaussians in the checkpoint."""
    gaussians_sha256: str
    """sha256 over the lineage ids and the parameter tensors (:func:`digest_tensors`)."""
    config_sha256: str
    """sha256 of the config the Gaussians were trained with (:func:`digest_config`)."""
    base_sha256: Optional[str] = None
    """sha256 of the weights file the file's model was fine-tuned from (the shipped prior, for
    ``prior_tuned.pt``); ``None`` for a file made from the run alone. Files written before the field read as
    ``None``."""

    def to_dict(self) -> Dict[str, Any]:
        """Plain (weights_only-safe) form."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "Provenance":
        """Inverse of :meth:`to_dict`; raises ``ValueError`` for anything else."""
        if not isinstance(data, dict):
            raise ValueError(f"provenance must be a dict, got {type(data).__name__}")
        step, count = data.get("step"), data.get("num_gaussians")
        digest, config, base = data.get("gaussians_sha256"), data.get("config_sha256"), data.get("base_sha256")
        if step is not None and (not isinstance(step, int) or isinstance(step, bool)):
            raise ValueError(f"provenance 'step' must be an int or None, got {step!r}")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError(f"provenance 'num_gaussians' must be a non-negative int, got {count!r}")
        for name, value in (("gaussians_sha256", digest), ("config_sha256", config)):
            if not isinstance(value, str) or len(value) != 64:
                raise ValueError(f"provenance '{name}' must be a sha256 hex digest, got {value!r}")
        if base is not None and (not isinstance(base, str) or len(base) != 64):
            raise ValueError(f"provenance 'base_sha256' must be a sha256 hex digest or None, got {base!r}")
        return cls(step=step, num_gaussians=count, gaussians_sha256=digest, config_sha256=config, base_sha256=base)

    def mismatches(self, expected: "Provenance") -> List[str]:
        """What differs from ``expected`` (empty when this matches it). The step is compared only where
        both know it; the count, both digests and the base weights always."""
        out = []
        if self.step is not None and expected.step is not None and self.step != expected.step:
            out.append(f"checkpoint step {self.step} (the run's checkpoint is step {expected.step})")
        if self.num_gaussians != expected.num_gaussians:
            out.append(f"{self.num_gaussians} Gaussians (the checkpoint has {expected.num_gaussians})")
        if self.gaussians_sha256 != expected.gaussians_sha256:
            out.append(f"ids/parameters sha256 {self.gaussians_sha256[:12]}... (the checkpoint's is "
                       f"{expected.gaussians_sha256[:12]}...)")
        if self.config_sha256 != expected.config_sha256:
            out.append(f"config sha256 {self.config_sha256[:12]}... (the run's is {expected.config_sha256[:12]}...)")
        if self.base_sha256 != expected.base_sha256:
            out.append(f"base weights sha256 {_short(self.base_sha256)} (the installed ones' is "
                       f"{_short(expected.base_sha256)})")
        return out


def _short(digest: Optional[str]) -> str:
    return "none" if digest is None else f"{digest[:12]}..."


# ------------------------------------------------------------------------------------------ file format
@dataclass(frozen=True)
class FileFormat:
    """One kind of tagged file: its tag, version, name in messages and required payload keys."""

    tag: str
    """Value of the ``format`` key."""
    version: int
    """Value of the ``version`` key this code writes and reads."""
    what: str
    """Name in messages, e.g. ``"GaussianVAE"`` ("... not a GaussianVAE file")."""
    keys: Mapping[str, Union[Type, Tuple[Type, ...]]] = dataclasses.field(default_factory=dict)
    """Required payload keys and their types."""
    rebuild: str = "delete it and make it again"
    """Default fix for messages (callers that know the run pass a precise one to :func:`load_tagged`)."""


def _sentence(text: str) -> str:
    text = text.strip()
    if not text:
        return ""
    text = text[0].upper() + text[1:]
    return text if text.endswith(".") else text + "."


def _message(path: Path, problem: str, rebuild: str) -> str:
    """``<path>: <problem>. <Rebuild>.`` as one paragraph."""
    return f"{path}: {problem.strip().rstrip('.')}. {_sentence(rebuild)}".strip()


@dataclass
class TaggedFile:
    """A loaded tagged file: its payload and provenance, and :meth:`fail` for format-specific checks."""

    path: Path
    fmt: FileFormat
    payload: Dict[str, Any]
    provenance: Optional[Provenance]
    rebuild: str

    def fail(self, problem: str) -> NoReturn:
        """Raise the one-paragraph :class:`TaggedFileError` for ``problem`` in this file."""
        raise TaggedFileError(_message(self.path, f"{problem} (a malformed {self.fmt.what} file)", self.rebuild))

    @contextlib.contextmanager
    def checking(self) -> Iterator[None]:
        """Turn any error raised while the caller interprets the payload (a shape, a dtype, a key that
        does not fit) into the same clean :class:`TaggedFileError`."""
        try:
            yield
        except TaggedFileError:
            raise
        except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as err:
            self.fail(f"its contents do not fit ({type(err).__name__}: {err})")

    def tensor(self, key: str, *, ndim: Optional[int] = None, dtype_kind: Optional[str] = None,
               rows: Optional[int] = None, finite: bool = False, source: Optional[Mapping[str, Any]] = None,
               label: Optional[str] = None) -> torch.Tensor:
        """``payload[key]`` (or ``source[key]``) checked to be a tensor with ``ndim`` dimensions, of a
        floating (``dtype_kind="f"``), integer (``"i"``) or bool (``"b"``) dtype, ``rows`` rows and, with
        ``finite``, no NaN / Inf."""
        name = label or key
        value = (self.payload if source is None else source).get(key)
        if not isinstance(value, torch.Tensor):
            self.fail(f"'{name}' is {type(value).__name__}, not a tensor")
        if ndim is not None and value.ndim != ndim:
            self.fail(f"'{name}' has shape {tuple(value.shape)}, expected {ndim} dimensions")
        kinds = {"f": value.is_floating_point(), "b": value.dtype == torch.bool,
                 "i": not value.is_floating_point() and not value.is_complex() and value.dtype != torch.bool}
        if dtype_kind is not None and not kinds[dtype_kind]:
            wanted = {"f": "a floating point", "i": "an integer", "b": "a bool"}[dtype_kind]
            self.fail(f"'{name}' is {value.dtype}, expected {wanted} tensor")
        if rows is not None and (value.ndim == 0 or value.shape[0] != rows):
            self.fail(f"'{name}' has shape {tuple(value.shape)}, expected {rows} rows")
        if finite and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            self.fail(f"'{name}' holds NaN or Inf values")
        return value


def save_tagged(path: Union[str, Path], fmt: FileFormat, payload: Mapping[str, Any],
                provenance: Optional[Provenance] = None) -> Path:
    """Write ``payload`` (plain values and CPU tensors) tagged with ``fmt`` and ``provenance`` to ``path``,
    atomically; returns the path."""
    clash = [k for k in _RESERVED if k in payload]
    if clash:
        raise ValueError(f"save_tagged: payload keys {clash} are reserved")
    missing = [k for k in fmt.keys if k not in payload]
    if missing:
        raise ValueError(f"save_tagged: {fmt.what} payload lacks {missing}")
    data = {"format": fmt.tag, "version": fmt.version,
            "provenance": None if provenance is None else provenance.to_dict(), **payload}
    return torch_save_atomic(data, path)


def load_tagged(path: Union[str, Path], fmt: FileFormat, expected: Optional[Provenance] = None,
                rebuild: Optional[str] = None, map_location: Union[str, torch.device] = "cpu") -> TaggedFile:
    """Read a file written by :func:`save_tagged` and check it (see the module docstring).

    ``expected``: the run the file must come from (``None``: not checked). ``rebuild``: the fix the
    messages give (default ``fmt.rebuild``). A missing file raises ``FileNotFoundError``; everything else
    that is wrong raises :class:`TaggedFileError`."""
    path = Path(path)
    rebuild = fmt.rebuild if rebuild is None else rebuild
    if not path.is_file():
        raise FileNotFoundError(_message(path, f"no such {fmt.what} file", rebuild))
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, not a torch file, a pickle that is not weights-only safe ...
        reason = (str(err).strip().splitlines() or [""])[0].split(". ")[0][:200]
        raise TaggedFileError(_message(path, f"not a readable {fmt.what} file, it cannot be read "
                                             f"({type(err).__name__}: {reason})", rebuild)) from None
    if not isinstance(data, dict) or data.get("format") != fmt.tag:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise TaggedFileError(_message(path, f"not a {fmt.what} file (format tag {found!r}, expected "
                                             f"{fmt.tag!r})", rebuild))
    if data.get("version") != fmt.version:
        raise TaggedFileError(_message(path, f"{fmt.what} file format version {data.get('version')!r}, this gvae-ns "
                                             f"reads version {fmt.version}", rebuild))
    loaded = TaggedFile(path=path, fmt=fmt, payload=data, provenance=None, rebuild=rebuild)
    for key, kind in fmt.keys.items():
        if key not in data:
            loaded.fail(f"it lacks the key '{key}'")
        if not isinstance(data[key], kind) or (kind is int and isinstance(data[key], bool)):
            names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            loaded.fail(f"'{key}' is {type(data[key]).__name__}, expected {names}")
    if data.get("provenance") is not None:
        try:
            loaded.provenance = Provenance.from_dict(data["provenance"])
        except ValueError as err:
            loaded.fail(str(err))
    if expected is not None:
        if loaded.provenance is None:
            raise TaggedFileError(_message(path, "it records no run it was made from, so it cannot be tied to "
                                                 "this checkpoint", rebuild))
        diff = loaded.provenance.mismatches(expected)
        if diff:
            raise TaggedFileError(_message(path, "it was made from another run state, not this checkpoint: it "
                                                 "records " + "; ".join(diff), rebuild))
    return loaded
