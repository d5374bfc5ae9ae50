"""Analytic cost model: FLOPs and minimum bytes moved by each implementation's algorithm.

Notation (docs/design.md). One branch of the RGA block sees features of shape (Cin, L) per image:
``Cin`` channels over ``L`` positions. With the paper's ratios (cha_ratio = spa_ratio =
down_ratio = 8 unless given):

=============  ==================  ==================
quantity       spatial branch      channel branch
=============  ==================  ==================
Cin            C                   N = H * W
L              N                   C
K (theta/phi)  C' = C // cha       N // spa
R (gg width)   N // spa            C' = C // cha
Hd (W hidden)  (1 + R) // down     (1 + R) // down
=============  ==================  ==================

Only multiply-adds of matmuls and 1x1 convs are counted (FLOPs = 2 x MACs); BatchNorm,
ReLU, the channel mean, sigmoid and gating are elementwise and left out (they are a few
percent at most). Bytes are a *lower bound* for the implementation's sequence of
operations: every tensor it must hand from one operation to the next through global
memory is written once and read once; anything a fused kernel keeps on chip is free.
"""
from __future__ import annotations

from dataclasses import dataclass

from rga_triton.common.algorithm import multiply_adds

BRANCHES = {"RGA-S": (True, False), "RGA-C": (False, True), "RGA-SC": (True, True)}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}

# What each implementation computes, for the cost model.
#   materialised: forms G = theta^T phi (L x L) and the 2L-channel concat [G^T; G] in global memory,
#                 then the gg 1x1 conv over 2L channels (the authors' code; eager PyTorch).
#   compiled:     the same algorithm under torch.compile: the same tensors cross global memory (the
#                 1x1 convs stay library calls, so G and the concat are still written and read).
#   reassociated-unfused: Z = (W_in phi^T) theta + (W_out theta^T) phi in plain PyTorch ops; no L x L
#                 tensor, but every op's output is a tensor in global memory (rga_triton backend="torch").
#   reassociated: the fused Triton path; same FLOPs as reassociated-unfused, nothing but x, out and the
#                 parameters crosses global memory (O(K L) hand-offs are ignored, being << x).
#   tiled:        the fused Triton path that builds G block by block on chip and feeds each block to the
#                 gg embedding: the materialised FLOPs, the fused bytes.
IMPL_ALGORITHM = {
    "reference": "materialised",
    "compile": "compiled",
    "compile-max-autotune": "compiled",
    "torch": "reassociated-unfused",
    "triton": "reassociated",
    "triton-tiled": "tiled",
    "triton-graphs": "reassociated",
}


def algorithm_for(impl: str, triton_label: str | None = None):
    """The cost-model algorithm of ``impl``: a name, or {branch: name} where the branches differ.

    ``triton`` and ``triton-graphs`` follow the label of what their branches ran
    (``impls.resolved_algorithms``): "tiled", "reassociated (auto)", "spatial:tiled+channel:reassociated (auto)".
    """
    if impl not in ("triton", "triton-graphs") or not triton_label:
        return IMPL_ALGORITHM[impl]
    name = triton_label.removesuffix(" (auto)")
    if name == "auto":
        return IMPL_ALGORITHM[impl]
    if "+" in name:
        return dict(part.split(":") for part in name.split("+"))
    return name


def _per_branch(algorithm, name: str) -> str:
    return algorithm[name] if isinstance(algorithm, dict) else algorithm


@dataclass(frozen=True)
class BranchDims:
    """Sizes of one branch, per image (see the module docstring's table)."""

    name: str
    cin: int
    length: int
    k: int
    r: int
    hidden: int


def branch_dims(c: int, h: int, w: int, branch: str, cha_ratio: int = 8, spa_ratio: int = 8,
                down_ratio: int = 8) -> list[BranchDims]:
    """The branches that ``branch`` ("RGA-S", "RGA-C", "RGA-SC") runs, in execution order."""
    use_spatial, use_channel = BRANCHES[branch]
    n = h * w
    c_inter, n_inter = c // cha_ratio, n // spa_ratio
    dims = []
    if use_spatial:
        dims.append(BranchDims("spatial", c, n, c_inter, n_inter, (1 + n_inter) // down_ratio))
    if use_channel:
        dims.append(BranchDims("channel", n, c, n_inter, c_inter, (1 + c_inter) // down_ratio))
    return dims


def branch_macs(d: BranchDims, algorithm: str) -> int:
    """Multiply-adds of one branch for one image, forward.

    * projections theta, phi, gx (three 1x1 convs Cin -> K):           3 K Cin L
    * relation pre-activation Z (R x L):
        materialised / compiled / tiled: G = theta^T phi costs K L^2, the gg conv over the
        2L stacked channels costs R * 2L * L                            K L^2 + 2 R L^2
        reassociated (fused or not): A_in = W_in phi^T and A_out = W_out theta^T cost R L K
        each, [A_in | A_out] [theta; phi] costs R * 2K * L              4 R K L
    * W network: conv (1 + R) -> Hd, conv Hd -> 1:                      Hd (1 + R) L + Hd L
    """
    projections = 3 * d.k * d.cin * d.length
    if algorithm in ("materialised", "compiled", "tiled"):
        relation = multiply_adds("tiled", d.r, d.k, d.length)         # forms G, as the tiled kernel does
    elif algorithm in ("reassociated", "reassociated-unfused"):
        relation = multiply_adds("reassociated", d.r, d.k, d.length)
    else:
        raise ValueError(f"unknown algorithm {algorithm!r}")
    w_net = d.hidden * (1 + d.r) * d.length + d.hidden * d.length
    return projections + relation + w_net


def flops(c: int, h: int, w: int, batch: int, branch: str, mode: str, algorithm, **ratios) -> int:
    """Analytic FLOPs of one step: 2 x MACs x batch, summed over the branches.

    ``algorithm``: one name for every branch, or {branch name: name}.

    Train mode (forward + backward) counts 3x the forward: every matmul's backward costs two
    matmuls of the same size (gradient of the input and of the weight). Recomputation an
    implementation may do in its backward is not counted: this is the algorithm's minimum.
    """
    forward = 2 * batch * sum(branch_macs(d, _per_branch(algorithm, d.name))
                              for d in branch_dims(c, h, w, branch, **ratios))
    return forward * (3 if mode == "train" else 1)


def state_elements(c: int, h: int, w: int, branch: str, **ratios) -> int:
    """Parameters and BatchNorm running statistics of the module (conv weights + 4 values per BN channel).

    Per branch: 1x1 conv weights 3 K Cin (theta, phi, gx) + R 2L (gg) + Hd (1 + R) + Hd (W);
    BatchNorm channels 3 K + R + Hd + 1, each with weight, bias, running mean, running var.
    ``num_batches_tracked`` is ignored.
    """
    total = 0
    for d in branch_dims(c, h, w, branch, **ratios):
        weights = 3 * d.k * d.cin + d.r * 2 * d.length + d.hidden * (1 + d.r) + d.hidden
        bn_channels = 3 * d.k + d.r + d.hidden + 1
        total += weights + 4 * bn_channels
    return total


def intermediate_elements(c: int, h: int, w: int, branch: str, algorithm: str, **ratios) -> int:
    """Elements per image an implementation hands between operations through global memory.

    Conv -> BatchNorm -> ReLU chains are counted as one tensor (as if fused): a lower bound.

    * materialised (eager reference) and compiled, per branch:
      theta, phi, gx embeddings 3 K L; G (L^2); the concat [G^T; G] (2 L^2); gg embedding R L;
      pooled mean L; concat y (1 + R) L; W hidden Hd L; logit L. G's transpose and the
      channel branch's transposed input are views (the 1x1 convs read them in place, the
      latter as a channels_last tensor), so they move nothing of their own. With both
      branches, the spatially gated x (C N) is an intermediate.
    * reassociated-unfused (backend="torch"), per branch:
      the stacked projection 3 K L and its BN/ReLU output 3 K L; A = [A_in | A_out] 2 R K;
      [theta; phi] 2 K L; Z R L; relation R L; pooled L; y (1 + R) L; hidden Hd L; logit L;
      plus the gated x (C N) between branches for RGA-SC.
    * reassociated / tiled (fused Triton, either per branch): 0.
    """
    if isinstance(algorithm, dict) or algorithm in ("reassociated", "tiled"):
        return 0
    dims = branch_dims(c, h, w, branch, **ratios)
    total = 0
    for d in dims:
        tail = d.r * d.length + d.length + (1 + d.r) * d.length + d.hidden * d.length + d.length
        if algorithm in ("materialised", "compiled"):
            total += 3 * d.k * d.length + 3 * d.length ** 2 + tail
        elif algorithm == "reassociated-unfused":
            total += 6 * d.k * d.length + 2 * d.r * d.k + 2 * d.k * d.length + d.r * d.length + tail
        else:
            raise ValueError(f"unknown algorithm {algorithm!r}")
    if len(dims) == 2:
        total += c * h * w
    return total


def min_bytes(c: int, h: int, w: int, batch: int, branch: str, mode: str, algorithm: str, dtype: str,
              **ratios) -> int:
    """Minimum bytes one step moves through global memory, all tensors in ``dtype``.

    With X = B C N (input elements, = output elements), P = :func:`state_elements`,
    S = B x :func:`intermediate_elements` and b branches (1 or 2):

    * eval: every gate depends on the whole map, so x cannot stay on chip from a branch's
      projection to the pass that applies its gate: each branch's projection reads its input
      (x, or for RGA-SC's second branch the gated map, formed on the fly by the fused path)
      and one last pass reads x and writes out; plus the parameters, and a write + read of
      every intermediate: (b + 1) X + X + P + 2 S. RGA-SC fused: 4 X + P (x read three
      times, written once).
    * train: the forward above, then the backward reads grad_out and x (or what it saved),
      writes grad_x, reads the parameters and writes their gradients, and for every
      intermediate reads the saved tensor, writes its gradient and reads it back:
      ((b + 2) X + P + 2 S) + (3 X + 2 P + 3 S) = (b + 5) X + 3 P + 5 S
    """
    x_elems = batch * c * h * w
    p_elems = state_elements(c, h, w, branch, **ratios)
    s_elems = batch * intermediate_elements(c, h, w, branch, algorithm, **ratios)
    forward_x = (sum(BRANCHES[branch]) + 2) * x_elems
    if mode == "train":
        elems = forward_x + 3 * x_elems + 3 * p_elems + 5 * s_elems
    else:
        elems = forward_x + p_elems + 2 * s_elems
    return elems * DTYPE_BYTES[dtype]
