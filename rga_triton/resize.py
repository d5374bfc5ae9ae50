"""Any input size: resample an RGA block's position-indexed weights to another H x W.

An RGA block is built for one feature-map size N = H * W. Four of its convolutions take
positions on their *input* axis; every other tensor of the block is indexed by channels only.
With p = (i, j) a position of the H x W map (flattened row-major, p = i * W + j):

- ``gg_spatial[0].weight`` (R, 2N): the spatial relation embedding,
  Z[k, p] = sum_q W_in[k, q] G[p, q] + sum_q W_out[k, q] G[q, p]; its input axis is two
  H x W maps per output row k (W_in on G's rows, then W_out on its columns);
- ``theta_channel[0].weight``, ``phi_channel[0].weight``, ``gx_channel[0].weight`` (R, N):
  the channel branch reads x as N "channels" over C "positions",
  theta[k, c] = sum_p W[k, p] x[c, p]; their input axis is one H x W map per output row k.

Each such map is resampled to H' x W' as timm resamples a ViT's position embeddings
(``torch.nn.functional.interpolate``, ``align_corners=False``, antialiased when shrinking)
and scaled by N / N': the resampled sum sum_{q'} w'[q'] g'[q'] over N' positions then
approximates sum_q w[q] g[q] over N, when g' is g sampled on the finer (or coarser) grid, as
a Riemann sum of the same integral at another cell size. So every layer after these four
(their BatchNorms, the W networks) sees its input on the same scale, and their weights and
running statistics still apply. The output sizes stay fixed: R = inter_spatial rows (N / s of
the *source* block) are learned embeddings, not positions, and the W_spatial network, the
BatchNorms of these four layers and everything of the spatial branch's width 1 + R keep their
sizes. A resized block therefore has in_spatial = N' but inter_spatial = R; see
:func:`resized_block` for how it is expressed as an ``RGAModule``.

docs/resize.md states the rule for every weight, the approximation, and measurements.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common.checks import one_of

MODES = ("bilinear", "bicubic")

# The block's submodules whose first conv has positions on its input axis: name -> maps per row.
POSITION_INPUTS = {"gx_channel": 1, "gg_spatial": 2, "theta_channel": 1, "phi_channel": 1}
# The most elements a resampled weight may have: 32-bit indexing's limit (8 GiB in float32), far past any
# feature map a block can run on; a typo like to_hw=(10**6, 10**6) is refused, not allocated (terabytes).
MAX_WEIGHT_ELEMENTS = 2**31 - 1


def check_hw(name: str, hw) -> tuple[int, int]:
    """``hw`` as an (H, W) tuple of positive ints, else a TypeError / ValueError naming ``name``."""
    if not isinstance(hw, (tuple, list)) or len(hw) != 2:
        raise TypeError(f"{name} must be an (H, W) pair of positive ints, got {hw!r}")
    for value in hw:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an (H, W) pair of positive ints, got {hw!r}")
        if value < 1:
            raise ValueError(f"{name} must be an (H, W) pair of positive ints, got {hw!r}")
    return int(hw[0]), int(hw[1])


def check_mode(mode) -> str:
    return one_of("mode", mode, MODES)


def resample_position_weight(weight: torch.Tensor, from_hw, to_hw, maps: int = 1,
                             mode: str = "bilinear") -> torch.Tensor:
    """(R, maps * N[, 1, 1]) -> (R, maps * N'[, 1, 1]): each row's ``maps`` H x W maps resampled.

    w'[k, m, :, :] = (N / N') * interpolate(w[k, m, :, :], size=(H', W')), N = H * W,
    N' = H' * W'; computed in float64 and returned in ``weight``'s dtype and device, detached.
    The same size returns an exact copy. Constants map to constants times N / N', so the sum
    of each row over positions is kept (exactly for constant rows, to O(h^2) for smooth ones).
    """
    from_hw, to_hw, mode = check_hw("from_hw", from_hw), check_hw("to_hw", to_hw), check_mode(mode)
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (2, 4) or not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point (R, maps*N) or (R, maps*N, 1, 1) tensor, got "
                        f"{type(weight).__name__ if not isinstance(weight, torch.Tensor) else tuple(weight.shape)}")
    (h, w), (h2, w2) = from_hw, to_hw
    if weight.dim() == 4 and weight.shape[2:] != (1, 1):
        raise ValueError(f"weight must be a 1x1 conv's weight, got shape {tuple(weight.shape)}")
    if weight.shape[1] != maps * h * w:
        raise ValueError(f"weight's input axis must hold maps={maps} map(s) of from_hw={from_hw} = {maps * h * w} "
                         f"entries, got shape {tuple(weight.shape)}")
    if from_hw == to_hw:
        return weight.detach().clone()
    rows = weight.shape[0]
    if rows * maps * h2 * w2 > MAX_WEIGHT_ELEMENTS:
        raise ValueError(f"to_hw={to_hw} would give the resampled weight {rows} x {maps * h2 * w2} = "
                         f"{rows * maps * h2 * w2:,} elements, more than the limit of {MAX_WEIGHT_ELEMENTS:,} "
                         f"(2**31 - 1); resample to a smaller H' x W'")
    grid = weight.detach().to(torch.float64).reshape(rows * maps, 1, h, w)
    out = F.interpolate(grid, size=to_hw, mode=mode, align_corners=False, antialias=True) * (h * w / (h2 * w2))
    out = out.reshape(rows, maps * h2 * w2, *weight.shape[2:])
    return out.to(dtype=weight.dtype, device=weight.device)


def spatial_ratio(in_spatial: int, inter_spatial: int, preferred: int | None = None) -> int | None:
    """A spa_ratio r with in_spatial // r == inter_spatial (``preferred`` if it is one), or None.

    The largest candidate is q = in_spatial // inter_spatial: r works iff
    in_spatial / (R + 1) < r <= in_spatial / R, so if q does not, no r does.
    """
    if preferred is not None and in_spatial // preferred == inter_spatial:
        return preferred
    q = in_spatial // inter_spatial
    return q if q >= 1 and in_spatial // q == inter_spatial else None


def _set_in_spatial(block: nn.Module, in_spatial: int) -> None:
    """Record the new size; spa_ratio becomes the standard one for (in_spatial, inter_spatial) if any."""
    block.in_spatial = in_spatial
    ratio = spatial_ratio(in_spatial, block.inter_spatial, block.spa_ratio)
    if ratio is not None:
        block.spa_ratio = ratio   # the block is then exactly RGAModule(..., in_spatial, spa_ratio=ratio)


def _replace_input_weight(conv: nn.Conv2d, weight: torch.Tensor) -> None:
    """Give ``conv`` a new weight whose input axis is resized (hooks and flags of the conv kept)."""
    conv.weight = nn.Parameter(weight, requires_grad=conv.weight.requires_grad)
    conv.in_channels = weight.shape[1]


def _check_block(block, from_hw) -> tuple[int, int]:
    # by its attributes, not isinstance: module.py imports this module (RGAModule.resized)
    if not (isinstance(block, nn.Module) and all(hasattr(block, a) for a in ("in_spatial", "inter_spatial", "branch"))):
        raise TypeError(f"block must be an RGAModule (rga_triton.convert() turns the authors' RGA_Module into "
                        f"one), got {type(block).__name__}")
    from_hw = check_hw("from_hw", from_hw)
    if from_hw[0] * from_hw[1] != block.in_spatial:
        raise ValueError(f"from_hw={from_hw} has {from_hw[0] * from_hw[1]} positions but the block's in_spatial is "
                         f"{block.in_spatial}: from_hw must be the H x W the block was built for")
    return from_hw


def resized_block(block, from_hw, to_hw, mode: str = "bilinear"):
    """A new block for ``to_hw`` = (H', W') feature maps, from ``block`` built for ``from_hw`` = (H, W).

    The four position-indexed input axes (:data:`POSITION_INPUTS`) are resampled by
    :func:`resample_position_weight` (scale N / N'); every other parameter, every BatchNorm
    buffer, the settings (backend, algorithm, order, ratios), the train/eval mode and
    ``requires_grad`` flags are copied. Gradients are not (``.grad`` is None). The result has
    in_spatial = H' * W' and the source's inter_spatial; its spa_ratio is the ratio r with
    H' * W' // r == inter_spatial when one exists (the block then equals what
    ``RGAModule(in_channel, H' * W', spa_ratio=r, ...)`` builds, parameter for parameter),
    else the source's. At ``to_hw == from_hw`` the weights are copied bit for bit.
    """
    from_hw = _check_block(block, from_hw)
    to_hw, mode = check_hw("to_hw", to_hw), check_mode(mode)
    new = copy.deepcopy(block)
    for p in new.parameters():
        p.grad = None
    if to_hw == from_hw:
        return new
    for name, maps in POSITION_INPUTS.items():
        seq = getattr(new, name, None)
        if seq is not None:
            _replace_input_weight(seq[0], resample_position_weight(seq[0].weight, from_hw, to_hw, maps, mode))
    _set_in_spatial(new, to_hw[0] * to_hw[1])
    return new


def block_like(block, in_spatial: int, inter_spatial: int):
    """A freshly initialised block with ``block``'s settings, ``in_spatial`` and ``inter_spatial`` (on
    ``block``'s device and dtype, in its mode). Used by ``load_checkpoint(..., source_size=)`` to give
    a model's block the checkpoint's output sizes."""
    new = type(block)(block.in_channel, in_spatial, block.use_spatial, block.use_channel, block.cha_ratio,
                    spatial_ratio(in_spatial, inter_spatial, block.spa_ratio) or block.spa_ratio, block.down_ratio,
                    backend=block.backend, algorithm=block.algorithm, order=block.order,
                    inter_spatial=inter_spatial)
    weight = next(block.parameters())
    return new.to(device=weight.device, dtype=weight.dtype).train(block.training)


def _backbone(model):
    # by its attributes, not isinstance: models/ imports checkpoint.py, which imports this module
    backbone = getattr(model, "backbone", model)
    if not (isinstance(backbone, nn.Module) and all(hasattr(backbone, attr) for attr in
                                                      ("rga_att1", "height", "width", "last_stride"))):
        raise TypeError(f"model must be an RGANet or RGABackbone (rga_triton.models.rga_net), got "
                        f"{type(model).__name__}")
    return backbone


def block_sizes(model, height: int, width: int) -> dict[str, tuple[int, int]]:
    """{'rga_att1': (h, w), ...}: each RGA block's feature-map size for a ``height`` x ``width`` input."""
    from .models.resnet import stage_sizes

    check_hw("(height, width)", (height, width))
    sizes = stage_sizes(height, width, _backbone(model).last_stride)
    return {f"rga_att{k}": hw for k, hw in enumerate(sizes, start=1)}


def resized_model(model, height: int, width: int, mode: str = "bilinear"):
    """A copy of RGA-Net ``model`` for ``height`` x ``width`` inputs: each block by :func:`resized_block`.

    Block k goes from its stage's map size at the model's input size to the one at the new
    size (rga_net's stage_sizes). Everything outside the blocks is size-independent and copied.
    """
    backbone = _backbone(model)
    mode = check_mode(mode)
    old, new_sizes = block_sizes(model, backbone.height, backbone.width), block_sizes(model, height, width)
    new = copy.deepcopy(model)
    new_backbone = _backbone(new)
    for name, hw in new_sizes.items():
        setattr(new_backbone, name, resized_block(getattr(new_backbone, name), old[name], hw, mode))
    for p in new.parameters():
        p.grad = None
    new_backbone.height, new_backbone.width = height, width
    return new


def resized_state_dict(model, state: dict, source_size, mode: str = "bilinear"):
    """Resample an RGA-Net state_dict trained at ``source_size`` = (H, W) input to ``model``'s size.

    Returns (new state, resampled keys, replacements); ``model`` is not changed. For each block
    of ``model``: its four position-indexed weights in ``state`` whose shape is the source
    stage's are resampled to the model's stage size (:func:`resample_position_weight`); where
    the checkpoint's output sizes (inter_spatial, read off those weights' rows) differ from the
    model block's, ``replacements`` maps the block's qualified name to :func:`block_like` with
    the checkpoint's inter_spatial, which the caller swaps in so that every tensor loads.
    Other keys are returned untouched (the caller reports what still mismatches).
    """
    backbone = _backbone(model)
    mode = check_mode(mode)
    source_size = check_hw("source_size", source_size)
    source = block_sizes(model, *source_size)
    target = block_sizes(model, backbone.height, backbone.width)
    prefix = next(name + "." for name, m in model.named_modules() if m is backbone) if backbone is not model else ""
    state, resampled, replacements = dict(state), [], {}
    for name, hw in target.items():
        block, (sh, sw) = getattr(backbone, name), source[name]
        rows = None
        for part, maps in POSITION_INPUTS.items():
            key = f"{prefix}{name}.{part}.0.weight"
            value = state.get(key)
            if (not isinstance(value, torch.Tensor) or getattr(block, part, None) is None or value.dim() != 4
                    or value.shape[1] != maps * sh * sw):
                continue
            rows = value.shape[0]
            # The rows decide the size of the block built below (W_spatial grows as their square): a file
            # may not ask for more than the sizes the caller gave (in_spatial // spa_ratio <= in_spatial).
            most = max(sh * sw, hw[0] * hw[1], block.inter_spatial)
            if rows > most:
                raise ValueError(f"checkpoint key {key!r} has {rows} relation rows, more than {name} can have: at "
                                 f"most {most}, the larger of its {sh} x {sw} map's positions at source_size="
                                 f"{source_size}, its {hw[0]} x {hw[1]} map's in the model and its own "
                                 f"{block.inter_spatial} rows; the file is not a checkpoint of this model at "
                                 f"that size")
            if (sh, sw) != hw:
                state[key] = resample_position_weight(value, (sh, sw), hw, maps, mode)
                resampled.append(key)
        if rows is not None and rows != block.inter_spatial:
            replacements[f"{prefix}{name}"] = block_like(block, hw[0] * hw[1], rows)
    return state, resampled, replacements
