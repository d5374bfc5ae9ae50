"""``convert(model)``: swap every RGA block of a model for ``RGAModule``, keeping its tensors.

A block is recognised by the authors' attribute structure, not by its class (``reference``
and the authors' ``rga_modules.RGA_Module`` are never imported): ``in_channel``,
``in_spatial``, ``use_spatial``, ``use_channel`` and, per enabled branch, the submodules
``theta_*``, ``phi_*``, ``gx_*``, ``gg_*`` (1x1 conv -> BatchNorm -> ReLU) and ``W_*``
(conv -> BatchNorm -> ReLU -> conv -> BatchNorm).
"""
from __future__ import annotations

import logging
import warnings

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import dispatch
from .common.modules import replace_submodule
from .module import RGAModule

logger = logging.getLogger("rga_triton")

_PARTS = ("theta", "phi", "gx", "gg", "W")
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def _branches(module) -> list[str]:
    return [name for name, flag in (("spatial", "use_spatial"), ("channel", "use_channel")) if getattr(module, flag)]


def is_rga_block(module: nn.Module) -> bool:
    """True for a module with the authors' RGA_Module structure that is not already an RGAModule."""
    if isinstance(module, RGAModule) or not isinstance(module, nn.Module):
        return False
    for name in ("in_channel", "in_spatial"):
        value = getattr(module, name, None)
        if isinstance(value, bool) or not isinstance(value, int):
            return False
    for name in ("use_spatial", "use_channel"):
        if not isinstance(getattr(module, name, None), (bool, int)):
            return False
    branches = _branches(module)
    return bool(branches) and all(f"{part}_{b}" in module._modules for b in branches for part in _PARTS)


def _is_1x1(conv) -> bool:
    return (type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.padding in ((0, 0), "valid") and conv.dilation == (1, 1) and conv.groups == 1
            and conv.bias is None)


def _check_structure(path: str, module: nn.Module) -> None:
    for branch in _branches(module):
        for part in _PARTS:
            name = f"{part}_{branch}"
            seq = getattr(module, name)
            kinds = ("conv", "bn", "relu", "conv", "bn") if part == "W" else ("conv", "bn", "relu")
            ok = isinstance(seq, nn.Sequential) and len(seq) == len(kinds) and all(
                (_is_1x1(m) if kind == "conv" else isinstance(m, _BatchNorm) if kind == "bn"
                 else type(m) is nn.ReLU) for m, kind in zip(seq, kinds))
            if not ok:
                want = ", ".join({"conv": "Conv2d 1x1 no bias", "bn": "BatchNorm2d", "relu": "ReLU"}[k] for k in kinds)
                raise ValueError(f"convert: RGA block {path!r}: {name} must be nn.Sequential({want}) as in the "
                                 f"authors' RGA_Module, got {seq!r}")


def _ratio(n: int, inter: int, preferred) -> int | None:
    """A ratio r with n // r == inter: the block's own attribute, 8, n // inter, or the smallest that works."""
    candidates = [preferred, 8, n // inter if inter else None]
    for r in candidates:
        if isinstance(r, int) and not isinstance(r, bool) and r >= 1 and n // r == inter:
            return r
    return next((r for r in range(1, n + 1) if n // r == inter), None)


def _down_ratio(widths_hidden, preferred) -> int | None:
    """A down_ratio d with (1 + width) // d == hidden for every enabled branch's W network."""
    def fits(d):
        return isinstance(d, int) and not isinstance(d, bool) and d >= 1 and all(
            (1 + w) // d == h for w, h in widths_hidden)
    candidates = [preferred, 8] + [(1 + w) // h for w, h in widths_hidden if h]
    for d in candidates:
        if fits(d):
            return d
    return next((d for d in range(1, 2 + max(w for w, _ in widths_hidden)) if fits(d)), None)


def _shapes(module: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def convert_block(module: nn.Module, path: str = "<block>", backend: str = "auto",
                  algorithm: str = "auto") -> RGAModule:
    """An RGAModule computing what ``module`` (an authors'-structure RGA block) computes.

    The new block takes over ``module``'s submodules themselves: the same parameter and buffer
    tensors (so an optimizer built before the conversion keeps working), device, dtype,
    BatchNorm settings, ``requires_grad`` flags and train/eval mode; hooks registered on the
    block itself move over too. A block's ``order`` attribute (``"sc"``, ``"cs"``,
    ``"parallel"``) is kept; the authors' block has none and is ``"sc"``. Raises ``ValueError``
    naming ``path`` when the ratios cannot be reconstructed or the rebuilt shapes differ from
    the block's.
    """
    dispatch.check_backend(backend), dispatch.check_algorithm(algorithm)
    _check_structure(path, module)
    in_channel, in_spatial = module.in_channel, module.in_spatial
    use_spatial, use_channel = bool(module.use_spatial), bool(module.use_channel)
    if use_spatial:
        inter_channel = module.theta_spatial[0].weight.shape[0]
        inter_spatial = module.gg_spatial[0].weight.shape[0]
    else:
        inter_channel = module.gg_channel[0].weight.shape[0]
        inter_spatial = module.theta_channel[0].weight.shape[0]
    cha_ratio = _ratio(in_channel, inter_channel, getattr(module, "cha_ratio", None))
    spa_ratio = _ratio(in_spatial, inter_spatial, getattr(module, "spa_ratio", None))
    hidden = [(w, getattr(module, f"W_{b}")[0].weight.shape[0])
              for b, w in (("spatial", inter_spatial), ("channel", inter_channel)) if getattr(module, f"use_{b}")]
    down_ratio = _down_ratio(hidden, getattr(module, "down_ratio", None))
    for name, value, what in (("cha_ratio", cha_ratio, f"in_channel={in_channel} -> {inter_channel} channels"),
                              ("spa_ratio", spa_ratio, f"in_spatial={in_spatial} -> {inter_spatial} channels"),
                              ("down_ratio", down_ratio, f"W networks (width, hidden) = {hidden}")):
        if value is None:
            raise ValueError(f"convert: RGA block {path!r}: no integer {name} gives its shapes ({what})")
    try:
        with torch.device("meta"):
            expected = RGAModule(in_channel, in_spatial, use_spatial, use_channel, cha_ratio, spa_ratio, down_ratio,
                                 backend=backend, algorithm=algorithm, order=getattr(module, "order", "sc"))
    except (ValueError, TypeError) as err:
        raise ValueError(f"convert: RGA block {path!r} cannot be rebuilt as an RGAModule: {err}") from err
    want, have = _shapes(expected), _shapes(module)
    if want != have:
        diffs = [f"{k}: block {have.get(k, 'absent')} vs RGAModule {want.get(k, 'absent')}"
                 for k in list(dict.fromkeys([*want, *have])) if want.get(k) != have.get(k)]
        raise ValueError(f"convert: RGA block {path!r} (in_channel={in_channel}, in_spatial={in_spatial}, "
                         f"cha_ratio={cha_ratio}, spa_ratio={spa_ratio}, down_ratio={down_ratio}) does not have the "
                         f"shapes of an RGAModule built from its attributes: " + "; ".join(diffs[:8])
                         + (f"; ... and {len(diffs) - 8} more" if len(diffs) > 8 else ""))
    for name in list(expected._modules):
        setattr(expected, name, getattr(module, name))   # same tensors; no meta tensor survives
    expected.training = module.training   # the submodules keep their own modes
    for hooks in _HOOK_DICTS:
        if getattr(module, hooks, None):
            setattr(expected, hooks, getattr(module, hooks))
    return expected


def convert(model: nn.Module, backend: str = "auto", algorithm: str = "auto", verbose: bool = False) -> nn.Module:
    """Replace every RGA block in ``model`` by an ``RGAModule``; return the model.

    Recognises the authors' ``RGA_Module`` (and ``reference.RGA_Module``, or anything with
    their attribute structure) wherever it sits, and swaps it in place for an ``RGAModule``
    that takes over its submodules: the same parameter and buffer tensors, device, dtype,
    BatchNorm settings and train/eval mode, so outputs, ``state_dict`` keys and an existing
    optimizer's parameters stay as they were. ``cha_ratio``, ``spa_ratio`` and
    ``down_ratio`` are read off the submodule shapes and checked: a block whose shapes do not
    rebuild exactly raises ``ValueError`` naming its path, and nothing is changed.

    Returns ``model`` (converted in place), or the new block when ``model`` itself is one.
    Reports the count as ``"rga_triton.convert: converted N RGA block(s): paths"``, logged at
    INFO on the ``"rga_triton"`` logger and printed when ``verbose=True``; finding no block
    at all is a ``UserWarning``. ``backend`` / ``algorithm`` are set on every new block.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    dispatch.check_backend(backend), dispatch.check_algorithm(algorithm)
    found: dict[int, tuple[nn.Module, list[str]]] = {}
    sites: list[tuple[str, int]] = []              # (path, block id) in module order, shared blocks at each path
    stack = [("", model)]
    while stack:                                   # no descent into blocks
        path, module = stack.pop()
        if is_rga_block(module):
            found.setdefault(id(module), (module, []))[1].append(path)
            sites.append((path, id(module)))
            continue
        stack.extend((f"{path}.{name}" if path else name, child)
                     for name, child in reversed(module._modules.items()) if child is not None)
    # Build every replacement before touching the model, so an error leaves it unchanged.
    replaced = {key: convert_block(module, paths[0] or "<model>", backend, algorithm)
                for key, (module, paths) in found.items()}
    result = model
    paths = []
    for path, key in sites:
        paths.append(path or "<model>")
        if not path:
            result = replaced[key]
            continue
        replace_submodule(model, path, replaced[key])
    message = f"rga_triton.convert: converted {len(found)} RGA block(s)" + (f": {', '.join(paths)}" if paths else "")
    if not found:
        present = sum(isinstance(m, RGAModule) for m in model.modules())
        if present:
            message += f" ({present} RGAModule block(s) already there)"
        else:
            warnings.warn(message + "; the model has no module with the authors' RGA_Module structure", stacklevel=2)
    logger.info(message)
    if verbose:
        print(message)
    return result
