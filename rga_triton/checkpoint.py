"""Load the authors' (and anyone's) training checkpoints into a model, with a report in words.

RGA-Net checkpoints in the wild were written by PyTorch 0.4 training scripts: the state_dict
sits inside a dict (``{'state_dict': ..., 'epoch': ..., 'optimizer': ...}``), its keys carry
DataParallel's ``module.`` prefix, and its BatchNorms have no ``num_batches_tracked``
(that buffer arrived in PyTorch 0.4.1). ``load_state_dict`` refuses all three;
:func:`load_checkpoint` accepts them and names whatever still does not match.
"""
from __future__ import annotations

import os
import pickle
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


def _resize_line(report: "CheckpointReport") -> str:
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
    where = []
    obj = checkpoint
    while True:
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
        others = [k for k in obj if k not in tensors and not str(k).endswith("_extra_state")]
        if others:
            raise ValueError(f"the checkpoint's state_dict{' under ' + ' / '.join(where) if where else ''} holds "
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


def _read(path_or_dict, map_location, weights_only):
    if isinstance(path_or_dict, (str, os.PathLike)):
        if not os.path.isfile(path_or_dict):
            raise FileNotFoundError(f"no checkpoint file at {os.fspath(path_or_dict)!r}")
        try:
            return torch.load(path_or_dict, map_location=map_location, weights_only=weights_only)
        except pickle.UnpicklingError as err:
            if not weights_only:
                raise
            raise RuntimeError(f"load_checkpoint: torch.load(weights_only=True) refused {os.fspath(path_or_dict)!r}: "
                               f"it holds objects other than tensors and plain containers (training scripts often "
                               f"save numpy values or whole modules). If you trust the file, pass "
                               f"weights_only=False.\n{err}") from err
    return path_or_dict


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

    ``source_size=(H, W)``: the checkpoint was trained on H x W inputs and ``model`` (an RGA-Net,
    :func:`rga_triton.models.rga_net`) is built for another size: each RGA block's
    position-indexed weights are resampled from its stage's map size at H x W to the model's
    (:func:`rga_triton.resize.resized_state_dict`, ``resize_mode`` "bilinear" or "bicubic",
    scaled by N/N'), and a block whose relation-embedding rows (inter_spatial) differ from
    the checkpoint's is rebuilt with the checkpoint's (``rga_net(height=384)`` has
    3072 // 8 = 384 rows in its first block, a 256 x 128 checkpoint 256). The report lists the
    resampled keys and rebuilt blocks. With ``strict=True`` and a mismatch the model is left as
    it was.
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
