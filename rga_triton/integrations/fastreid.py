"""fast-reid: importing this module registers the backbone ``build_rga_resnet_backbone``.

Name it in a config (``MODEL.BACKBONE.NAME: "build_rga_resnet_backbone"``) and fast-reid's meta
architectures (``Baseline`` and the others) get fast-reid's own ResNet, built by its
``build_resnet_backbone`` from the same config, with an RGA block after each of its four stages
(:func:`rga_triton.attach`): every ResNet fast-reid builds, with its keys, its pretrained weights and
its forward, returning its (B, C, H/16, W/16) map (H/32, W/32 at ``LAST_STRIDE: 2``); fast-reid's
heads add the pooling, the BNNeck and the classifier.

Read from the config:

- by fast-reid's ``build_resnet_backbone``, exactly as for ``build_resnet_backbone``:
  ``MODEL.BACKBONE.DEPTH`` (``18x``, ``34x``, ``50x``, ``101x`` in fast-reid 1.4.0), ``WITH_IBN``
  (ResNet-IBN-a), ``WITH_SE``, ``WITH_NL`` (non-local blocks), ``LAST_STRIDE``, ``NORM``,
  ``PRETRAIN`` / ``PRETRAIN_PATH`` (loaded by fast-reid before the blocks exist, so its files load
  without renaming; without a path it downloads its own ImageNet file for the depth, IBN and SE);
- ``MODEL.BACKBONE.NORM``: ``"BN"`` or ``"syncBN"`` (the RGA blocks' BatchNorms are converted to
  ``nn.SyncBatchNorm`` too, and synchronise their statistics in multi-rank training, on the
  Triton path as on the torch path); other norms raise (the blocks' normalisation is BatchNorm);
- ``INPUT.SIZE_TRAIN`` (H, W): the input size the model trains at, which fixes the RGA blocks'
  ``in_spatial`` and so their weights' shapes (and the state_dict's);
- ``INPUT.SIZE_TEST`` (H', W'): the input size it evaluates at. Where it differs from
  ``SIZE_TRAIN``, eval-mode calls on the test size's maps run through blocks resized to them
  (:mod:`rga_triton.resize`, docs/resize.md): "Train at one size, evaluate at another" below;
- ``MODEL.BACKBONE.RGA`` (a node this module adds to fast-reid's defaults, so ``get_cfg()`` and
  YAML files know it): ``USE_SPATIAL``, ``USE_CHANNEL``, ``CHA_RATIO``, ``SPA_RATIO``,
  ``DOWN_RATIO``, ``ORDER``, ``BACKEND``, ``ALGORITHM`` (RGAModule's arguments, the paper's values
  by default). ``add_rga_config(cfg)`` adds it to a config made before this import.

Where a stage's output is: fast-reid's ResNet calls each stage's blocks one by one and puts its
non-local blocks after some of them, so stage k's output is that of ``layer{k}``'s last block, or of
the non-local block that follows it (``NL_2.1`` and ``NL_3.2`` for R50 with ``WITH_NL``):
:func:`stage_names`. The blocks are ``rga_att1`` .. ``rga_att4`` on the backbone; with DEPTH ``50x``
and no IBN/SE/NL the backbone's state_dict keys are RGA-Net's backbone keys.

Train at one size, evaluate at another
--------------------------------------
fast-reid trains on ``SIZE_TRAIN`` images and evaluates on ``SIZE_TEST`` ones: its evaluator
(``inference_on_dataset``) puts the model in eval mode and forwards test images, and its
``DefaultPredictor`` calls ``model.eval()`` and then loads the checkpoint. An RGA block is built for
one map size (four of its convs have positions on their input axis), so where a stage's map at
``SIZE_TEST`` differs from the one at ``SIZE_TRAIN``, its block is a :class:`TestSizeRGAModule`: an
``RGAModule`` built, trained and saved at the train size, which in eval mode also takes the test
size's maps and runs them through its position-indexed weights resampled to that size
(:func:`rga_triton.resize.resample_position_weight`: bilinear, scaled by N / N', the rule of
docs/resize.md; an approximation of a block trained at that size, not the same function).

The resampled weights are derived on every such call, from the block's weights as they are at that
moment, and nothing derived is kept (the rule of docs/design.md, "Nothing derived outlives a
call"). Deriving once per switch to eval mode would serve stale weights to ``DefaultPredictor``,
which loads the checkpoint after ``eval()``, and to any update made in eval mode; a key on the
tensors' versions misses updates through ``.data`` (an EMA teacher), as docs/design.md shows. The
cost is four float64 interpolations per block call: 36 ms for stage 1 of a 256 x 128 model evaluated
at 384 x 128 (64 x 32 -> 96 x 32 maps, ResNet-50's 256 channels, RGA-SC; one thread of a loaded
2-core CPU), the later stages less.

So the model is one model at the train size: ``state_dict()`` keys and shapes are those of the
model built with ``SIZE_TEST = SIZE_TRAIN`` (a checkpoint of either loads strictly into the other,
and fast-reid's ``Checkpointer``, which skips a key whose shape differs, loads every key),
``parameters()``, ``.to()``, DDP and optimizers see the train-size weights only, and an eval pass
changes nothing in them. Test-size calls are for inference: the resampled weights
are detached, so a backward from them reaches no position-indexed weight, and in train mode a
test-size map raises. A ``SIZE_TEST`` that no block can be resized to (a resampled weight past
:data:`rga_triton.resize.MAX_WEIGHT_ELEMENTS`) raises at build, naming ``INPUT.SIZE_TEST`` and
the stage.
"""
from __future__ import annotations

import contextlib
import copy
import threading

import torch
import torch.nn as nn
from fastreid.config import CfgNode
from fastreid.config import defaults as _defaults
from fastreid.modeling.backbones import BACKBONE_REGISTRY
from fastreid.modeling.backbones.resnet import build_resnet_backbone

from ..attach import attach, attached, stage_outputs
from ..module import RGAModule
from ..resize import POSITION_INPUTS, resample_position_weight, resized_block

__all__ = ["add_rga_config", "build_rga_resnet_backbone", "stage_names", "serve_test_size", "TestSizeRGAModule",
           "RGA_DEFAULTS"]

RGA_DEFAULTS = dict(USE_SPATIAL=True, USE_CHANNEL=True, CHA_RATIO=8, SPA_RATIO=8, DOWN_RATIO=8, ORDER="sc",
                    BACKEND="auto", ALGORITHM="auto")
NORMS = ("BN", "syncBN")
_TWIN_LOCK = threading.Lock()
"""Held by a :class:`TestSizeRGAModule` test-size call while its twin holds the call's tensors."""


def add_rga_config(cfg) -> None:
    """Add ``MODEL.BACKBONE.RGA`` with its defaults to ``cfg`` (kept where it is already there)."""
    if "RGA" not in cfg.MODEL.BACKBONE:
        frozen = cfg.is_frozen()
        cfg.defrost()
        cfg.MODEL.BACKBONE.RGA = CfgNode(dict(RGA_DEFAULTS))
        if frozen:
            cfg.freeze()


def _rga_settings(cfg) -> dict:
    node = dict(RGA_DEFAULTS, **dict(cfg.MODEL.BACKBONE.get("RGA", {})))
    unknown = sorted(set(node) - set(RGA_DEFAULTS))
    if unknown:
        raise ValueError(f"MODEL.BACKBONE.RGA has unknown keys {unknown}; known: {sorted(RGA_DEFAULTS)}")
    return dict(use_spatial=node["USE_SPATIAL"], use_channel=node["USE_CHANNEL"], cha_ratio=node["CHA_RATIO"],
                spa_ratio=node["SPA_RATIO"], down_ratio=node["DOWN_RATIO"], order=node["ORDER"],
                backend=node["BACKEND"], algorithm=node["ALGORITHM"])


def _size(cfg, key: str) -> tuple[int, int]:
    size = tuple(cfg.INPUT[key])
    if len(size) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in size):
        raise ValueError(f"INPUT.{key} must be [height, width], two positive ints, got {list(size)}")
    return size


def stage_names(resnet: nn.Module) -> list[str]:
    """The submodules whose outputs are the four stages' outputs in fast-reid's ResNet ``resnet``:
    ``layer{k}.{last}``, or ``NL_{k}.{j}`` where a non-local block follows ``layer{k}``'s last block."""
    names = []
    for k in range(1, 5):
        last = len(getattr(resnet, f"layer{k}")) - 1
        nonlocal_after = [i for i in getattr(resnet, f"NL_{k}_idx", []) if i >= 0]   # fast-reid's forward puts -1
        names.append(f"NL_{k}.{len(nonlocal_after) - 1}" if nonlocal_after and nonlocal_after[-1] == last
                     else f"layer{k}.{last}")
    return names


class TestSizeRGAModule(RGAModule):
    """An ``RGAModule`` built and trained for ``train_hw`` maps that, in eval mode, also runs ``test_hw``
    maps, through its position-indexed weights resampled to ``test_hw`` at each call.

    :func:`serve_test_size` makes one from a block; its parameters, buffers, state_dict keys and shapes,
    settings and hooks are the block's, unchanged. A call on a (B, C, *test_hw) map in eval mode
    resamples the four position-indexed weights (:data:`rga_triton.resize.POSITION_INPUTS`) from
    ``train_hw`` to ``test_hw`` by :func:`~rga_triton.resize.resample_position_weight`, and runs
    :func:`~rga_triton.resize.resized_block`'s block for ``test_hw`` with them and with this block's
    other parameters and buffers as they are (``torch.func.functional_call`` on a weightless twin of
    that block on the meta device, kept outside the module tree; test-size calls from several threads
    take turns on it, under a lock). The output equals that of ``resized_block(self, train_hw,
    test_hw)`` called at that moment. Every other call is ``RGAModule``'s. Module docstring: why on
    every call, and what it costs.
    """

    train_hw: tuple[int, int]
    test_hw: tuple[int, int]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, train_hw={self.train_hw}, test_hw={self.test_hw}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hw = tuple(x.shape[2:]) if isinstance(x, torch.Tensor) and x.dim() == 4 else None
        # in_spatial: a copy resized to another size (resized_block deep-copies this class) is a plain block
        if hw != self.test_hw or self.in_spatial != self.train_hw[0] * self.train_hw[1]:
            return super().forward(x)
        if self.training:
            raise ValueError(f"x is a {hw[0]} x {hw[1]} map, the test size (INPUT.SIZE_TEST) of this RGA block "
                             f"built for {self.train_hw[0]} x {self.train_hw[1]} maps (INPUT.SIZE_TRAIN): test-size "
                             f"maps run in eval mode only, through weights resampled from the train-size ones")
        twin = self.__dict__["_test_twin"]
        tensors = {**dict(self.named_parameters()), **dict(self.named_buffers())}
        for part, maps in POSITION_INPUTS.items():
            if getattr(self, part, None) is not None:
                key = f"{part}.0.weight"
                tensors[key] = resample_position_weight(tensors[key], self.train_hw, self.test_hw, maps)
        # functional_call puts the tensors on the shared twin for the call: one call at a time (threads
        # serving one model), except while torch.compile traces (dynamo cannot trace a lock; it traces the
        # swap as data, so compiled graphs share nothing)
        with contextlib.nullcontext() if torch.compiler.is_compiling() else _TWIN_LOCK:
            twin.backend, twin.algorithm, twin.order = self.backend, self.algorithm, self.order   # as set now
            return torch.func.functional_call(twin, tensors, (x,), strict=True)


def serve_test_size(block: RGAModule, train_hw, test_hw) -> TestSizeRGAModule:
    """Make ``block`` (an ``RGAModule`` for ``train_hw`` maps) a :class:`TestSizeRGAModule` for ``test_hw``,
    in place, and return it: its class changes, nothing else (parameters, buffers, keys, hooks, mode).

    The twin it runs test-size calls on is ``resized_block`` of a meta-device copy (no data, no key:
    stored outside ``_modules``); building it runs resize's checks, so a ``test_hw`` that cannot be
    resized raises ``ValueError`` here.
    """
    if not isinstance(block, RGAModule) or isinstance(block, TestSizeRGAModule):
        raise TypeError(f"block must be a plain RGAModule, got {type(block).__name__}")
    twin = resized_block(copy.deepcopy(block).to("meta"), train_hw, test_hw).eval()
    block.__class__ = TestSizeRGAModule
    block.train_hw, block.test_hw = tuple(train_hw), tuple(test_hw)
    block.__dict__["_test_twin"] = twin         # not a submodule: no state_dict key, no parameter
    return block


@BACKBONE_REGISTRY.register()
def build_rga_resnet_backbone(cfg) -> nn.Module:
    """fast-reid's ResNet from ``cfg`` with an RGA block after each stage (the module docstring: the keys it
    reads; blocks whose stage map differs at ``INPUT.SIZE_TEST`` become :class:`TestSizeRGAModule`)."""
    backbone_cfg = cfg.MODEL.BACKBONE
    norm = backbone_cfg.NORM
    if norm not in NORMS:
        raise ValueError(f"MODEL.BACKBONE.NORM must be one of {NORMS} for build_rga_resnet_backbone, got {norm!r}")
    train, test = _size(cfg, "SIZE_TRAIN"), _size(cfg, "SIZE_TEST")
    rga = _rga_settings(cfg)
    try:
        model = build_resnet_backbone(cfg)
    except KeyError as err:
        raise ValueError(f"MODEL.BACKBONE.DEPTH must be a depth fast-reid's build_resnet_backbone builds ('18x', "
                         f"'34x', '50x', '101x' in fast-reid 1.4.0), got {backbone_cfg.DEPTH!r}") from err
    stages = stage_names(model)
    # Each stage's output at both sizes, measured before attach (its blocks would refuse the test maps)
    shapes = {size: {name: tuple(out.shape[1:]) for name, out in stage_outputs(model, stages, size).items()}
              for size in dict.fromkeys((train, test))}
    attach(model, stages, train, stage_shapes=shapes[train], **rga)
    if norm == "syncBN":     # fast-reid's syncBN ResNet is nn.SyncBatchNorm already: convert the blocks only
        for name in attached(model).values():
            setattr(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(getattr(model, name)))
    for k, (stage, name) in enumerate(attached(model).items(), start=1):
        train_hw, test_hw = shapes[train][stage][1:], shapes[test][stage][1:]
        if test_hw != train_hw:
            try:
                serve_test_size(getattr(model, name), train_hw, test_hw)
            except ValueError as err:
                raise ValueError(f"INPUT.SIZE_TEST={list(test)}: the RGA block after stage {k} ({stage!r}, "
                                 f"{train_hw[0]} x {train_hw[1]} maps at INPUT.SIZE_TRAIN={list(train)}) cannot be "
                                 f"resized to its {test_hw[0]} x {test_hw[1]} maps: {err}") from err
    return model


add_rga_config(_defaults._C)     # fast-reid's get_cfg() clones this node
