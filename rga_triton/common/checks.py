"""Argument checks with errors that name the argument, the expected and the actual value."""
from __future__ import annotations

import operator
from collections import Counter

import numpy as np
import torch
import torch.nn as nn

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def one_of(name: str, value, choices: tuple):
    """``value`` when it is one of ``choices``, else a ValueError naming ``name`` and the choices."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def positive_int(name: str, value) -> int:
    """``value`` as a Python int: ints of any kind (Python, NumPy, 0-d integer tensors), never bools or floats."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})") from None
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


def block_sizes(in_channel, in_spatial, use_spatial, use_channel, cha_ratio, spa_ratio, down_ratio,
                inter_spatial=None):
    """Check the constructor arguments; return (inter_channel, inter_spatial).

    The authors' module crashes inside a conv when an embedding or a W network would
    have zero channels; here that is a ValueError naming the ratio and the smallest size
    that works. ``inter_spatial``, where given, overrides in_spatial // spa_ratio (a block
    resampled from another size keeps its relation rows: ``RGAModule.resized``).
    """
    in_channel, in_spatial, cha_ratio, spa_ratio, down_ratio = (
        positive_int(name, value) for name, value in (("in_channel", in_channel), ("in_spatial", in_spatial),
                                                      ("cha_ratio", cha_ratio), ("spa_ratio", spa_ratio),
                                                      ("down_ratio", down_ratio)))
    for name, value in (("use_spatial", use_spatial), ("use_channel", use_channel)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__} ({value!r})")
    if not (use_spatial or use_channel):
        raise ValueError("use_spatial and use_channel are both False: the block would compute nothing "
                         "(the authors' module returns None); enable at least one branch")
    if inter_spatial is not None:
        inter_spatial = positive_int("inter_spatial", inter_spatial)
    inter_channel, inter_spatial = in_channel // cha_ratio, inter_spatial or in_spatial // spa_ratio
    if inter_channel < 1:
        raise ValueError(f"in_channel // cha_ratio must be >= 1 (in_channel >= cha_ratio = {cha_ratio}), "
                         f"got in_channel={in_channel}, cha_ratio={cha_ratio}")
    if inter_spatial < 1:
        raise ValueError(f"in_spatial // spa_ratio must be >= 1 (in_spatial >= spa_ratio = {spa_ratio}), "
                         f"got in_spatial={in_spatial}, spa_ratio={spa_ratio}")
    # The W networks have (1 + width) // down_ratio hidden channels.
    for used, width, width_name, size_name, ratio_name, ratio in (
        (use_spatial, inter_spatial, "in_spatial // spa_ratio", "in_spatial", "spa_ratio", spa_ratio),
        (use_channel, inter_channel, "in_channel // cha_ratio", "in_channel", "cha_ratio", cha_ratio),
    ):
        if used and (1 + width) // down_ratio < 1:
            raise ValueError(
                f"down_ratio={down_ratio} leaves the W network with (1 + {width_name}) // down_ratio = 0 hidden "
                f"channels: need {width_name} >= down_ratio - 1 = {down_ratio - 1} "
                f"({size_name} >= {ratio * (down_ratio - 1)} at {ratio_name}={ratio}) or down_ratio <= {1 + width}")
    return inter_channel, inter_spatial


def input_tensor(x, in_channel: int, in_spatial: int, weight: torch.Tensor) -> None:
    """Check x against the module: (B, in_channel, H, W), H*W == in_spatial, float, same device/dtype."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be a floating-point tensor (one of float16, bfloat16, float32, float64), "
                        f"got dtype {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (B, in_channel={in_channel}, H, W) with H*W == in_spatial={in_spatial}, "
                         f"got shape {tuple(x.shape)}")
    if x.shape[1] != in_channel:
        raise ValueError(f"x.shape[1] must equal in_channel={in_channel}, got shape {tuple(x.shape)}")
    if x.shape[2] * x.shape[3] != in_spatial:
        raise ValueError(f"x's H*W must equal in_spatial={in_spatial}, got H*W = {x.shape[2]}*{x.shape[3]} = "
                         f"{x.shape[2] * x.shape[3]} (shape {tuple(x.shape)})")
    if x.device != weight.device:
        raise ValueError(f"x is on device {x.device} but the module's parameters are on {weight.device}; "
                         f"move one of them (module.to(x.device))")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"x has dtype {x.dtype} but the module's parameters are {weight.dtype}; "
                        f"cast one of them (module.to({x.dtype})) or run under torch.autocast")


def _allowed(p: torch.Tensor, owner: nn.Module, dtype: torch.dtype, device: torch.device) -> bool:
    # BatchNorm affine parameters may stay float32 in a half-precision module (apex O2's
    # keep_batchnorm_fp32 convention): every path normalises in float32 anyway.
    same_dtype = p.dtype == dtype or (p.dtype == torch.float32 and isinstance(owner, nn.modules.batchnorm._BatchNorm))
    return same_dtype and p.device == device


def _all_match(module: nn.Module, dtype: torch.dtype, device: torch.device) -> bool:
    # Walks the _parameters / _modules dicts directly: about 3x cheaper than module.parameters().
    for p in module._parameters.values():
        if p is not None and not _allowed(p, module, dtype, device):
            return False
    for child in module._modules.values():
        if child is not None and not _all_match(child, dtype, device):
            return False
    return True


def uniform_parameters(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """``weight``, after checking that every parameter of ``module`` has its dtype and device.

    Runs on every forward (~10-15 us for an RGA-SC block); a mixed module (say after
    ``module.gg_spatial.half()``) would otherwise fail deep inside a path, or run in mixed
    precision. Buffers are not checked: BatchNorm statistics may stay wider than the weights,
    and so may BatchNorm weights and biases (float32 in a half-precision module).
    """
    if _all_match(module, weight.dtype, weight.device):
        return weight
    owned = [(f"{prefix}.{name}" if prefix else name, p, owner)
             for prefix, owner in module.named_modules() for name, p in owner.named_parameters(recurse=False)]
    convs = [(name, p) for name, p, owner in owned if not isinstance(owner, nn.modules.batchnorm._BatchNorm)]
    autocast = " (for mixed precision keep the module in one dtype and run under torch.autocast)"
    for attr, error, verbs, hint in (("device", ValueError, ("is on", "are on"), ""),
                                     ("dtype", TypeError, ("is", "are"), autocast)):
        # the convolutions' majority is what the module is meant to be (ties: the first one's)
        expected = Counter(getattr(p, attr) for _, p in convs).most_common(1)[0][0]
        dtype, device = (weight.dtype, expected) if attr == "device" else (expected, weight.device)
        odd = [name for name, p, owner in owned
               if getattr(p, attr) != expected and not (attr == "dtype" and _allowed(p, owner, dtype, device))]
        if odd:
            first = dict((name, p) for name, p, _ in owned)[odd[0]]
            listed = ", ".join(odd[:4]) + (", ..." if len(odd) > 4 else "")
            target = repr(str(expected)) if attr == "device" else str(expected)
            raise error(f"parameter {odd[0]} {verbs[0]} {getattr(first, attr)} but the module's other "
                        f"parameters {verbs[1]} {expected} ({len(odd)} of {len(owned)} differ: {listed}): call "
                        f"module.to({target}) so that all share one {attr}{hint}")
    return weight
