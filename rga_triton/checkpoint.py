"""Load the authors' (and anyone's) training checkpoints into a model, with a report in words.

RGA-Net checkpoints in the wild were written by PyTorch 0.4 training scripts: the state_dict
sits inside a dict (``{'state_dict': ..., 'epoch': ..., 'optimizer': ...}``), its keys carry
DataParallel's ``module.`` prefix, and its BatchNorms have no ``num_batches_tracked``
(that buffer arrived in PyTorch 0.4.1). ``load_state_dict`` refuses all three;
:func:`load_checkpoint` accepts them and names whatever still does not match.
"""
from __future__ import annotations

import io
import os
import pickle
import pickletools
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .common.modules import replace_submodule

# Where training scripts put the state_dict inside a checkpoint dict, most common first.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "state", "weights", "params",
                   "module")
# Prefixes that wrappers add to every key: DataParallel / DistributedDataParallel, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_SHOWN = 12   # keys listed per category in messages


@dataclass
class CheckpointReport:
    """What :func:`load_checkpoint` found and did. ``str(report)`` says it in words."""

    source: str                                   # where the state_dict was found in the file
    loaded_keys: list[str] = field(default_factory=list)
    missing_keys: list[str] = field(default_factory=list)       # in the model, not in the checkpoint
    unexpected_keys: list[str] = field(default_factory=list)    # in the checkpoint, not in the model
    mismatched_shapes: dict[str, tuple[tuple, tuple]] = field(default_factory=dict)  # key: (checkpoint, model)
    filled_keys: list[str] = field(default_factory=list)        # num_batches_tracked set to 0 (pre-0.4.1 files)
    stripped_prefixes: list[str] = field(default_factory=list)  # e.g. ['module.'] from DataParallel
    # load_checkpoint(..., source_size=): position-indexed weights resampled from that input size
    source_size: tuple[int, int] | None = None                  # the checkpoint's input (H, W)
    target_size: tuple[int, int] | None = None                  # the model's input (H, W)
    resampled_keys: list[str] = field(default_factory=list)
    rebuilt_blocks: list[str] = field(default_factory=list)     # blocks given the checkpoint's inter_spatial
    resize_mode: str | None = None

    @property
    def ok(self) -> bool:
        """True when every key of the model was loaded and nothing was left over."""
        return not (self.missing_keys or self.unexpected_keys or self.mismatched_shapes)

    def problems(self) -> list[str]:
        lines = []
        if self.missing_keys:
            lines.append(f"{len(self.missing_keys)} key(s) missing from the checkpoint (the model has them, the "
                         f"checkpoint does not){_hint_missing(self.missing_keys)}: {_listing(self.missing_keys)}")
        if self.unexpected_keys:
            lines.append(f"{len(self.unexpected_keys)} unexpected key(s) (in the checkpoint, not in the model): "
                         f"{_listing(self.unexpected_keys)}")
        if self.mismatched_shapes:
            shown = [f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}{_hint_shape(k)}"
                     for k, (a, b) in list(self.mismatched_shapes.items())[:_SHOWN]]
            more = len(self.mismatched_shapes) - len(shown)
            lines.append(f"{len(self.mismatched_shapes)} shape mismatch(es): " + "; ".join(shown)
                         + (f"; ... and {more} more" if more > 0 else ""))
        return lines

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded_keys)} key(s) from the checkpoint's {self.source}"]
        if self.stripped_prefixes:
            lines.append(f"stripped the key prefix(es) {', '.join(repr(p) for p in self.stripped_prefixes)}")
        if self.filled_keys:
            lines.append(f"set {len(self.filled_keys)} num_batches_tracked buffer(s) the checkpoint predates to 0")
        if self.source_size is not None:
            lines.append(_resize_line(self))
        return "\n".join(lines + (self.problems() or ["every key of the model matched"]))


def _resize_line(report: CheckpointReport) -> str:
    (h, w), (h2, w2) = report.source_size, report.target_size
    if not report.resampled_keys:
        return (f"source_size {h} x {w}: no position-indexed weight needed resampling for the model's "
                f"{h2} x {w2} input")
    line = (f"resampled {len(report.resampled_keys)} position-indexed weight(s) of the RGA blocks from a {h} x {w} "
            f"input to the model's {h2} x {w2} ({report.resize_mode}, scaled by N/N'; an approximation, see "
            f"docs/resize.md): {_listing(report.resampled_keys)}")
    if report.rebuilt_blocks:
        line += (f"; rebuilt {', '.join(report.rebuilt_blocks)} with the checkpoint's inter_spatial (the relation "
                 f"embedding's rows are learned, not positions, and keep their number)")
    return line


def _listing(keys) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f", ... and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")


def _hint_missing(keys) -> str:
    heads = sorted({k.split(".")[0] for k in keys})
    return f" (under {', '.join(heads)})" if len(heads) <= 4 else ""


def _hint_shape(key: str) -> str:
    if key.endswith(("gg_spatial.0.weight", "theta_channel.0.weight", "phi_channel.0.weight",
                     "gx_channel.0.weight")):
        return (" (its size follows in_spatial = H*W of the feature map: trained at another input height/width? "
                "load_checkpoint(..., source_size=(H, W)) resamples it)")
    if key.startswith(("cls.", "classifier.", "fc.")):
        return " (another number of classes?)"
    return ""


def find_state_dict(checkpoint) -> tuple[dict, str]:
    """(state_dict, where) from a checkpoint object: a bare state_dict or a dict holding one."""
    where, seen = [], set()
    obj = checkpoint
    while True:
        if id(obj) in seen:     # d["state_dict"] = d: a file can make the dicts refer to themselves
            raise ValueError(f"the checkpoint's dicts refer back to themselves under {' / '.join(where)}: "
                             f"found no state_dict")
        seen.add(id(obj))
        if isinstance(obj, nn.Module):
            return dict(obj.state_dict()), " / ".join(where + ["module's state_dict()"])
        if not isinstance(obj, Mapping):
            raise TypeError(f"checkpoint must be a state_dict or a dict holding one, got {type(obj).__name__}"
                            + (f" under {' / '.join(repr(w) for w in where)}" if where else ""))
        nested = next((k for k in STATE_DICT_KEYS if isinstance(obj.get(k), (Mapping, nn.Module))), None)
        if nested is not None:
            where.append(repr(nested))
            obj = obj[nested]
            continue
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if not tensors:
            raise ValueError(f"found no state_dict in the checkpoint{' under ' + ' / '.join(where) if where else ''}: "
                             f"its keys are {_listing(map(repr, obj.keys())) or 'none'}; expected a mapping of "
                             f"names to tensors, or one under {', '.join(repr(k) for k in STATE_DICT_KEYS)}")
        named = " under " + " / ".join(where) if where else ""
        odd = [k for k in obj if not isinstance(k, str)]
        if odd:
            raise ValueError(f"the checkpoint's state_dict{named} has keys that are not strings: "
                             f"{_listing(f'{k!r} ({type(k).__name__})' for k in odd)}; a state_dict maps "
                             f"parameter names such as 'conv1.weight' to tensors")
        others = [k for k in obj if k not in tensors and not k.endswith("_extra_state")]
        if others:
            raise ValueError(f"the checkpoint's state_dict{named} holds "
                             f"non-tensor values: {_listing(map(repr, others))}")
        return dict(obj), " / ".join(where) if where else "top level (a bare state_dict)"


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DataParallel / DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _strip_prefixes(state: dict, model_keys) -> tuple[dict, list[str]]:
    stripped = []
    changed = True
    while changed and state:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state) and not all(k.startswith(prefix) for k in model_keys):
                state = {k[len(prefix):]: v for k, v in state.items()}
                stripped.append(prefix)
                changed = True
    return state, stripped


def match_state_dict(model: nn.Module, checkpoint, ignore_missing=(), ignore_unexpected=(), prepare=None):
    """Normalise ``checkpoint`` against ``model``: (state_dict to load, report), loading nothing.

    ``ignore_missing`` / ``ignore_unexpected``: key prefixes left out of the report's missing /
    unexpected lists (e.g. ``("fc.",)`` for an ImageNet classifier a backbone does not have).
    ``prepare``: called on the state_dict once its wrapper prefixes are stripped, returns the
    one to match (``load_checkpoint``'s resampling; it may change ``model``'s blocks).
    """
    state, source = find_state_dict(checkpoint)
    state, stripped = _strip_prefixes(state, model.state_dict().keys())
    if prepare is not None:
        state = prepare(state)
    target = model.state_dict()
    filled = []
    for key in target:
        if key.rsplit(".", 1)[-1] == "num_batches_tracked" and key not in state:
            sibling = key[: -len("num_batches_tracked")] + "running_mean"
            if sibling in state:   # a BatchNorm saved before PyTorch 0.4.1: start its count at 0, as BN does
                state[key] = torch.zeros((), dtype=torch.long)
                filled.append(key)
    mismatched = {k: (tuple(v.shape), tuple(target[k].shape)) for k, v in state.items()
                  if k in target and isinstance(v, torch.Tensor) and v.shape != target[k].shape}
    report = CheckpointReport(
        source=source,
        missing_keys=[k for k in target if k not in state and not k.startswith(tuple(ignore_missing))],
        unexpected_keys=[k for k in state if k not in target and not k.startswith(tuple(ignore_unexpected))],
        mismatched_shapes=mismatched,
        filled_keys=filled,
        stripped_prefixes=stripped,
    )
    loadable = {k: v for k, v in state.items() if k in target and k not in mismatched}
    report.loaded_keys = list(loadable)
    return loadable, report


def _damage(path) -> str | None:
    """Why the file at ``path`` is not a torch.save file, found without unpickling anything; None when
    its structure is sound. Called only after torch.load failed, to tell a damaged file from one that
    holds what weights_only=True refuses (torch raises the same UnpicklingError for both)."""
    try:
        f = open(path, "rb")
    except OSError:
        return None          # unreadable (permissions...): torch's own error says so
    try:
        with f:
            head = f.read(4)
            if not head:
                return "it is empty"
            f.seek(0)
            if head == b"PK\x03\x04":          # torch.save's format since PyTorch 1.6: a zip archive
                with zipfile.ZipFile(f) as archive:
                    bad = archive.testzip()       # reads every member against its CRC
                    if bad is not None:
                        return f"its zip member {bad!r} fails its CRC check"
                    pickles = [n for n in archive.namelist() if n.rsplit("/", 1)[-1] == "data.pkl"]
                    if len(pickles) != 1:
                        return "its zip archive holds no data.pkl: torch.save did not write it"
                    _check_pickle(archive.read(pickles[0]))
                return None
            # The legacy format (PyTorch < 1.6, the authors' files): five pickles (magic number, protocol
            # version, system info, the object, its storage keys), then the raw storages.
            if torch.serialization.MAGIC_NUMBER not in [arg for _, arg, _ in pickletools.genops(f)]:
                return "it is neither a zip archive nor a legacy torch.save file (no magic number)"
            for _ in range(4):
                _check_pickle(f)
    except Exception as err:   # pickletools: ValueError for an unknown opcode, truncated data...; BadZipFile
        return f"it is truncated or damaged ({type(err).__name__}: {_first_line(err)})"
    return None


def _check_pickle(data) -> None:
    """Walk one pickle's opcodes (``data``: bytes, or a file at the pickle's start) without running any:
    a ValueError for an unknown opcode, truncated data, a memo entry never stored, a broken stack."""
    pickletools.dis(data, out=io.StringIO())


def _first_line(err) -> str:
    line = (str(err).splitlines() or [""])[0]
    return line if len(line) <= 200 else line[:200] + "..."


def _read(path_or_dict, map_location, weights_only):
    if not isinstance(path_or_dict, (str, os.PathLike)):
        return path_or_dict
    path = os.fspath(path_or_dict)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path!r}")
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as err:
        damage = _damage(path)
        if damage is None and isinstance(err, (OSError, RuntimeError)) and not _loads(path, weights_only):
            # sound pickles, yet unreadable on the CPU too: a legacy file cut inside its raw storages,
            # a zip header that Python's zipfile tolerates and torch's reader does not
            damage = "torch cannot read its data"
        if damage is not None:
            raise ValueError(f"load_checkpoint: {path!r} is not a readable PyTorch checkpoint: {damage} "
                             f"(torch.load: {type(err).__name__}: {_first_line(err)})") from err
        if isinstance(err, pickle.UnpicklingError) and weights_only:
            raise RuntimeError(f"load_checkpoint: torch.load(weights_only=True) refused {path!r}: it holds objects "
                               f"other than tensors and plain containers (training scripts often save numpy values "
                               f"or whole modules). If you trust the file, pass weights_only=False.\n{err}") from err
        raise      # a sound file that torch cannot load as asked (map_location, a class it cannot find...)


def _loads(path, weights_only) -> bool:
    """Whether torch.load reads ``path`` onto the CPU. A legacy file cut inside its raw storages has sound
    pickles, and torch says so with a RuntimeError, as it says a map_location problem."""
    try:
        torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception:
        return False
    return True


def load_checkpoint(model: nn.Module, path_or_dict, strict: bool = True, map_location="cpu",
                    weights_only: bool = True, source_size=None, resize_mode: str = "bilinear") -> CheckpointReport:
    """Load a training checkpoint (file path or already-loaded object) into ``model``.

    Accepts the authors' RGA-Net files and their relatives:

    - the state_dict bare, or inside a dict under ``'state_dict'``, ``'model_state_dict'``,
      ``'model'``, ``'net'``, ... (nested dicts are followed), or an ``nn.Module``;
    - keys prefixed by ``module.`` (DataParallel / DistributedDataParallel) or ``_orig_mod.``
      (torch.compile), and a ``model`` that is itself wrapped in any of these;
    - BatchNorms saved before PyTorch 0.4.1, without ``num_batches_tracked``: those buffers are
      set to 0, as ``nn.BatchNorm2d`` itself does for such old state_dicts.

    ``strict=True``: every key of the model must be in the checkpoint with the same shape and
    nothing may be left over, else a ``RuntimeError`` lists the missing, unexpected and
    mismatched keys in words and nothing is loaded. ``strict=False``: loads the keys that match
    (same name and shape) and leaves the rest. Returns a :class:`CheckpointReport` either way.
    ``map_location`` and ``weights_only`` go to ``torch.load`` for a path (``weights_only=True``
    reads tensors and plain containers only; pass ``False`` for a file you trust that needs more).
    A file that is not a readable torch.save file (empty, truncated, damaged) raises one ValueError
    that names it.

    ``source_size=(H, W)``: the checkpoint was trained on H x W inputs and ``model`` (an RGA-Net,
    :func:`rga_triton.models.rga_net`) is built for another size: each RGA block's
    position-indexed weights are resampled from its stage's map size at H x W to the model's
    (:func:`rga_triton.resize.resized_state_dict`, ``resize_mode`` "bilinear" or "bicubic",
    scaled by N/N'), and a block whose relation-embedding rows (inter_spatial) differ from
    the checkpoint's is rebuilt with the checkpoint's (``rga_net(height=384)`` has
    3072 // 8 = 384 rows in its first block, a 256 x 128 checkpoint 256; more rows than the larger
    of the source map's positions, the model's and the block's own are refused with a ValueError
    before anything is built). The report lists the resampled keys and rebuilt blocks. With
    ``strict=True`` and a mismatch the model is left as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    target = unwrap(model)
    resized, replaced = {}, {}
    prepare = None
    if source_size is not None:
        from .resize import block_sizes, check_hw, check_mode, resized_state_dict

        source_size, resize_mode = check_hw("source_size", source_size), check_mode(resize_mode)
        block_sizes(target, *source_size)           # a TypeError naming the model before any file is read

        def prepare(state):
            state, resized["keys"], replacements = resized_state_dict(target, state, source_size, resize_mode)
            for name, block in replacements.items():
                replaced[name] = replace_submodule(target, name, block)
            return state

    loadable, report = match_state_dict(target, _read(path_or_dict, map_location, weights_only), prepare=prepare)
    if source_size is not None:
        report.source_size, report.resize_mode = source_size, resize_mode
        report.target_size = (target.height, target.width)
        report.resampled_keys, report.rebuilt_blocks = resized.get("keys", []), list(replaced)
    if strict and not report.ok:
        for name, block in replaced.items():
            replace_submodule(target, name, block)      # put the model's own blocks back: nothing changed
        raise RuntimeError("load_checkpoint: the checkpoint does not match the model (strict=True; nothing was "
                           "loaded; strict=False loads the keys that match and returns this report):\n  "
                           + "\n  ".join(report.problems()))
    target.load_state_dict(loadable, strict=strict)
    return report
