"""``attach(model, after, input_size, **rga_kwargs)``: an RGA block after named stages of any CNN.

The paper's recipe is "an RGA block after each stage". ``attach`` applies it to any ``nn.Module``
without knowing its code: it measures each named stage's output (channels, H x W) in one forward
at ``input_size``, builds an :class:`~rga_triton.RGAModule` for it, and makes the stage's output
go through the block.

Mechanism: a forward hook, with the block a real submodule of the model's root
------------------------------------------------------------------------------
Each block is registered on ``model`` itself under a stable name (``rga_att1``, ``rga_att2``, ...,
the authors' names; ``names=`` picks others), and a forward hook on the stage returns
``block(stage_output)`` in place of the stage's output. Why a hook, not a wrapper
``nn.Sequential(stage, block)`` put where the stage was:

- the model's structure and every key of the base network stay as they were (a wrapper moves the
  stage's keys under a new prefix, ``layer1.0.conv1`` becoming ``layer1.0.0.conv1``, so pretrained
  files and code that indexes the stage break);
- it works where the model does not call the stage as a whole: fast-reid's ResNet calls the blocks
  of ``layer1`` one by one, so the stage to name is ``layer1.2``, whose parent is a Sequential;
  a wrapper changes that Sequential's indices, a hook changes nothing;
- the blocks are submodules with fixed names, so ``state_dict()`` / ``load_state_dict(strict=True)``
  round-trip, ``.to()``, ``.eval()``, ``nn.SyncBatchNorm.convert_sync_batchnorm`` and DDP see their
  parameters and buffers, and ``torch.compile(fullgraph=True)`` traces the hooks with the model
  (Dynamo inlines module hooks; tested).

The hook finds its block by name on the root at every call (it holds the root and the name, no
block), so a block replaced later (``model.rga_att1 = other``, ``RGANet.resized``) is the one that
runs, and ``copy.deepcopy`` / pickling give a model whose hooks call the copy's blocks.
``nn.DataParallel`` replicas share their original's hooks and would run the original's blocks:
the hook refuses a replica with an error (use DistributedDataParallel, as PyTorch recommends).

Pretrained weights of the base network
--------------------------------------
No key of the base model changes, so its weights load without renaming: before ``attach`` with
``load_state_dict(weights, strict=True)`` as always, or after it with ``strict=False``, where the
only missing keys are the blocks' (``rga_att1.*``, ...; :func:`block_keys` lists them to check).
``attach`` changes no parameter or buffer of the base model: the measuring forward runs on the meta
device (nothing computed, nothing written) in eval mode, and restores every module's mode.

Stage sizes
-----------
One forward of a ``(1, C, H, W)`` input (``input_size`` is ``(H, W)``, C = 3, or ``(C, H, W)``) on
the meta device through ``torch.func.functional_call`` with meta copies of the parameters and
buffers (free: no data is allocated), stopped once every named stage has produced its output.
Where the model does not run on the meta device (an op without a meta kernel, a tensor made
on a real device inside ``forward``, data-dependent control flow), one real batch-1 forward
in eval mode under ``torch.no_grad`` on the model's device measures them instead.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

from .module import RGAModule

__all__ = ["attach", "attached", "block_keys", "stage_outputs"]

_REGISTRY = "_rga_attached"          # plain attribute on the root: {stage name: block name}, in order
_SIZE_FROM_STAGE = ("in_channel", "in_spatial")


class _ThroughBlock:
    """Forward hook on a stage: its output through the block ``block_name`` of ``owner``.

    Looks the block up at every call (see the module docstring: replacement, deepcopy).
    """

    def __init__(self, owner: nn.Module, stage_name: str, block_name: str):
        self.owner, self.stage_name, self.block_name = owner, stage_name, block_name

    def __call__(self, module: nn.Module, args, output):
        if getattr(module, "_is_replica", False):
            raise RuntimeError(f"the RGA block {self.block_name!r} after stage {self.stage_name!r} cannot run in an "
                               f"nn.DataParallel replica (replicas share the original's forward hooks, which would "
                               f"run the original's blocks): use DistributedDataParallel")
        return getattr(self.owner, self.block_name)(output)


class _Measured(Exception):
    """Raised by the measuring hooks once every stage has produced its output: the rest is not run."""


def _input_shape(input_size) -> tuple[int, int, int]:
    size = tuple(input_size) if isinstance(input_size, Sequence) and not isinstance(input_size, str) else None
    if (size is None or len(size) not in (2, 3)
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in size)):
        raise ValueError(f"input_size must be (H, W) or (C, H, W) positive ints, got {input_size!r}")
    return size if len(size) == 3 else (3, *size)


def _reference_tensor(model: nn.Module) -> torch.Tensor | None:
    """The model's first floating parameter (else buffer): the device and dtype of its blocks."""
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor
    return None


def _forward(model: nn.Module, x: torch.Tensor, stages: dict[str, nn.Module], on_meta: bool) -> dict:
    """{stage name: its first output} from one eval-mode forward of ``x`` (stopped when all are seen)."""
    seen: dict[str, object] = {}

    def record(name):
        def hook(module, args, output):
            seen.setdefault(name, output)
            if len(seen) == len(stages):
                raise _Measured
        return hook

    # prepend: a stage that already has a block records its own output, before the block's hook
    handles = [module.register_forward_hook(record(name), prepend=True) for name, module in stages.items()]
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")            # blocks already attached say they run on meta
            if on_meta:
                state = {name: t.to("meta") for name, t in (*model.named_parameters(), *model.named_buffers())}
                torch.func.functional_call(model, state, (x,), strict=False)
            else:
                model(x)
    except _Measured:
        pass
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return seen


def stage_outputs(model: nn.Module, after: Sequence[str], input_size) -> dict[str, object]:
    """{stage name: its output for one ``input_size`` image}: a (meta) tensor, or whatever the stage returned.

    One forward on the meta device; a real batch-1 forward on the model's device where the model
    does not run on meta (see the module docstring). Raises ``RuntimeError`` naming the stages that
    did not run, or both forwards' errors.
    """
    stages = {name: model.get_submodule(name) for name in after}
    shape = _input_shape(input_size)
    reference = _reference_tensor(model)
    try:
        seen = _forward(model, torch.zeros((1, *shape), device="meta",
                                           dtype=reference.dtype if reference is not None else None), stages, True)
    except Exception as meta_error:            # noqa: BLE001  (any failure on meta: measure for real)
        x = torch.zeros((1, *shape), device=reference.device if reference is not None else "cpu",
                        dtype=reference.dtype if reference is not None else None)
        try:
            seen = _forward(model, x, stages, False)
        except Exception as error:
            raise RuntimeError(f"attach: measuring the stages needs one forward of a (1, {shape[0]}, {shape[1]}, "
                               f"{shape[2]}) input (input_size={input_size!r}); it failed on the meta device "
                               f"({type(meta_error).__name__}: {meta_error}) and on {x.device} "
                               f"({type(error).__name__}: {error})") from error
    missing = [name for name in after if name not in seen]
    if missing:
        raise RuntimeError(f"attach: stage(s) {missing} did not run in the model's forward at input_size="
                           f"{input_size!r}, so nothing would go through their blocks: name the submodules whose "
                           f"outputs the forward uses (a model that calls a Sequential's children one by one "
                           f"runs the children, e.g. 'layer1.2', not 'layer1')")
    return {name: seen[name] for name in after}


def _check_names(model: nn.Module, after, names) -> tuple[list[str], list[dict], list[str]]:
    if isinstance(after, Mapping):
        stages, per_stage = list(after), [dict(after[name] or {}) for name in after]
    elif isinstance(after, Sequence) and not isinstance(after, str):
        stages, per_stage = list(after), [{} for _ in after]
    else:
        raise TypeError(f"after must be a list of submodule names or a {{name: RGAModule kwargs}} dict, "
                        f"got {type(after).__name__}")
    if not stages:
        raise ValueError("after must name at least one stage, got none")
    for name in stages:
        if not isinstance(name, str) or not name:
            raise ValueError(f"after: every stage must be a submodule's qualified name (e.g. 'layer1'), got {name!r}")
        try:
            model.get_submodule(name)
        except AttributeError:
            children = [child for child, _ in model.named_children()]
            raise ValueError(f"after: the model ({type(model).__name__}) has no submodule {name!r}; its children "
                             f"are {children} (qualified names as in model.named_modules())") from None
    if len(set(stages)) != len(stages):
        raise ValueError(f"after names a stage twice: {stages}")
    names = [f"rga_att{k}" for k in range(1, len(stages) + 1)] if names is None else list(names)
    if len(names) != len(stages):
        raise ValueError(f"names must give one block name per stage ({len(stages)}), got {len(names)}")
    for name in names:
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"names: each block name must be an identifier (an attribute of the model), got {name!r}")
        if hasattr(model, name):
            raise ValueError(f"names: the model already has an attribute {name!r}; pick other names= "
                             f"(attach was already applied?)")
    if len(set(names)) != len(names):
        raise ValueError(f"names has a name twice: {names}")
    for kwargs in per_stage:
        taken = sorted(set(_SIZE_FROM_STAGE) & set(kwargs))
        if taken:
            raise TypeError(f"attach sets {taken} from the stage's output; do not pass them")
    return stages, per_stage, names


def attach(model: nn.Module, after, input_size, *, names: Sequence[str] | None = None,
           stage_shapes: Mapping[str, Sequence[int]] | None = None, **rga_kwargs) -> nn.Module:
    """Insert an :class:`~rga_triton.RGAModule` after each stage named in ``after``; returns ``model``.

    ``model``: any ``nn.Module`` whose stages output (B, C, H, W) maps, not an ``nn.Sequential`` /
    ``ModuleList`` / ``ModuleDict`` itself (a block registered on a Sequential would join its
    sequence: attach to a module that holds it). ``after``: the stages' qualified names as in
    ``model.named_modules()`` (``["layer1", "layer2", "layer3", "layer4"]``), or a dict
    ``{name: {RGAModule kwargs}}`` whose per-stage arguments override ``rga_kwargs`` for that block.
    ``input_size``: ``(H, W)`` (3-channel images) or ``(C, H, W)``, the size the model will be
    trained and run at: each block's ``in_channel`` and ``in_spatial = H' * W'`` come from its stage's
    output at that size (:func:`stage_outputs`). ``rga_kwargs``: ``RGAModule``'s other arguments
    (``use_spatial``, ``use_channel``, ``cha_ratio``, ``spa_ratio``, ``down_ratio``, ``backend``,
    ``algorithm``, ``order``). ``names``: the blocks' attribute names on ``model`` (default
    ``rga_att1``, ``rga_att2``, ... in the order of ``after``). ``stage_shapes``: ``{name: (C, H', W')}``
    of every stage's output at ``input_size`` where the caller knows them (RGA-Net's ResNet-50 does):
    then no forward is run to measure them.

    The block after stage k is ``model.<names[k]>``, on the model's device and dtype and in its
    train/eval mode, and the stage's output goes through it wherever the model's forward runs the
    stage (mechanism, weight loading and measurement: the module docstring). A block computes
    exactly what a standalone ``RGAModule`` with its parameters computes on the stage's output.

    Errors name the stage: ``ValueError`` for a name that is not a submodule, a stage whose output is
    not a 4-D tensor, and a stage whose size leaves a W network no hidden channel (RGAModule's
    message, prefixed with the stage and its size); ``RuntimeError`` for a stage the forward does
    not run. Nothing is attached unless every block builds.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        raise TypeError(f"model is an nn.{type(model).__name__}: a block registered on it would become part of "
                        f"it; attach to an nn.Module that holds it (e.g. a small class whose forward calls it)")
    stages, per_stage, names = _check_names(model, after, names)
    if stage_shapes is None:
        outputs = stage_outputs(model, stages, input_size)
    else:
        if set(stage_shapes) != set(stages):
            raise ValueError(f"stage_shapes must have one (C, H, W) per stage {stages}, got {sorted(stage_shapes)}")
        outputs = {name: torch.empty((1, *stage_shapes[name]), device="meta") for name in stages}
    height, width = _input_shape(input_size)[1:]
    reference = _reference_tensor(model)
    blocks = []
    for k, (stage, kwargs, output) in enumerate(zip(stages, per_stage, outputs.values()), start=1):
        where = f"stage {k} ({stage!r}"
        if not isinstance(output, torch.Tensor) or output.dim() != 4:
            got = f"a {output.dim()}-D tensor of shape {tuple(output.shape)}" if isinstance(output, torch.Tensor) \
                else f"a {type(output).__name__}"
            raise ValueError(f"attach: {where}) must output a 4-D (B, C, H, W) feature map for an RGA block; at "
                             f"input_size={tuple(input_size)!r} it returned {got}")
        c, h, w = output.shape[1:]
        where += f", {c} channels, {h} x {w} = {h * w} positions at a {height} x {width} input)"
        try:
            block = RGAModule(c, h * w, **{**rga_kwargs, **kwargs})
        except ValueError as err:
            raise ValueError(f"attach: RGA block after {where}: {err}. Use a larger input_size or smaller "
                             f"ratios for this stage (after={{name: {{...}}}} takes per-stage arguments)") from err
        except TypeError as err:
            raise TypeError(f"attach: RGA block after {where}: {err} (rga_kwargs are RGAModule's arguments)") from err
        if reference is not None:
            block = block.to(device=reference.device, dtype=reference.dtype)
        blocks.append(block.train(model.training))
    registry = dict(getattr(model, _REGISTRY, {}))
    for stage, name, block in zip(stages, names, blocks):
        model.add_module(name, block)
        model.get_submodule(stage).register_forward_hook(_ThroughBlock(model, stage, name))
        registry[stage] = name
    setattr(model, _REGISTRY, registry)
    return model


def attached(model: nn.Module) -> dict[str, str]:
    """{stage name: block name} for the blocks :func:`attach` put on ``model`` (empty if none)."""
    return dict(getattr(model, _REGISTRY, {}))


def block_keys(model: nn.Module) -> list[str]:
    """The state_dict keys of the attached blocks: what a base network's weights do not have."""
    prefixes = tuple(f"{name}." for name in attached(model).values())
    return [key for key in model.state_dict() if key.startswith(prefixes)]

