"""Issue 26: what the README's API table promises is there after ``import rga_triton``; the constructor takes
ints of any kind, as relation_maps does; a resize to an absurd size is refused, not allocated."""
from __future__ import annotations

import ast
import re

import numpy as np
import pytest
import torch

import rga_triton
from rga_triton.resize import MAX_WEIGHT_ELEMENTS, resample_position_weight

from paths import REPO_ROOT


def _api_table_names() -> set[str]:
    """The first name of each row of the README's 'Public API' table: `RGAModule(...)` -> RGAModule,
    `models.rga_net(...)` -> models, `testing.rel_err(...)` -> testing."""
    text = open(f"{REPO_ROOT}/README.md").read()
    table = text.split("## Public API", 1)[1].split("\n\n", 2)[1]
    return {re.match(r"\| `(\w+)", row).group(1) for row in table.splitlines()[2:]}


def _bound_by_init() -> set[str]:
    """The names rga_triton/__init__.py binds itself (imports, defs, assignments): a test process imports
    submodules such as rga_triton.testing anyway, so ``hasattr`` here would pass without them."""
    tree = ast.parse(open(f"{REPO_ROOT}/rga_triton/__init__.py").read())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {alias.asname or alias.name for alias in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def test_every_name_of_the_readme_api_table_is_bound_by_import_rga_triton():
    names = _api_table_names()
    assert {"RGAModule", "testing", "models", "integrations", "load_checkpoint"} <= names   # the parse works
    assert not names - _bound_by_init(), f"README names {sorted(names - _bound_by_init())}, not bound by __init__"
    assert all(hasattr(rga_triton, name) for name in names)
    assert rga_triton.testing.rel_err(torch.ones(3), torch.ones(3)) == 0


@pytest.mark.parametrize("make", [np.int64, np.int32, np.uint16, torch.tensor], ids=["int64", "int32", "uint16",
                                                                                    "tensor"])
def test_constructor_takes_numpy_and_tensor_ints(make):
    block = rga_triton.RGAModule(make(16), make(16), cha_ratio=make(4), spa_ratio=make(2), down_ratio=make(2),
                                 inter_spatial=make(8), backend="torch")
    plain = rga_triton.RGAModule(16, 16, cha_ratio=4, spa_ratio=2, down_ratio=2, inter_spatial=8, backend="torch")
    sizes = ("in_channel", "in_spatial", "cha_ratio", "spa_ratio", "down_ratio", "inter_channel", "inter_spatial")
    assert all(type(getattr(block, a)) is int and getattr(block, a) == getattr(plain, a) for a in sizes)
    assert {k: v.shape for k, v in block.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    assert repr(block) == repr(plain)


@pytest.mark.parametrize("value", [16.0, np.float64(16), True, np.True_, torch.tensor(True), torch.tensor(16.0),
                                   "16"], ids=lambda v: f"{type(v).__name__}({v!r})")
def test_constructor_refuses_bools_and_floats_naming_the_argument(value):
    with pytest.raises(TypeError, match=r"in_channel must be an int, got"):
        rga_triton.RGAModule(value, 16)
    with pytest.raises(TypeError, match=r"spa_ratio must be an int, got"):
        rga_triton.RGAModule(16, 16, spa_ratio=value)


def test_constructor_refuses_non_positive_numpy_ints():
    with pytest.raises(ValueError, match="in_spatial must be a positive int, got 0"):
        rga_triton.RGAModule(16, np.int64(0))


def test_resize_to_an_absurd_size_is_refused_before_allocating():
    block = rga_triton.RGAModule(8, 16, cha_ratio=2, spa_ratio=2, down_ratio=2, backend="torch")
    with pytest.raises(ValueError, match=r"to_hw=\(1000000, 1000000\) would give the resampled weight 8 x "
                                         r"1000000000000 = .* more than the limit of 2,147,483,647"):
        block.resized((4, 4), (10**6, 10**6))
    # the limit itself: 2 rows of 2**30 - 1 positions fit (checked, not built), one more position does not
    weight = torch.zeros(2, 1, 1, 1)
    with pytest.raises(ValueError, match="more than the limit"):
        resample_position_weight(weight, (1, 1), (1, 2**30), maps=1)
    assert 2 * (2**30 - 1) <= MAX_WEIGHT_ELEMENTS < 2 * 2**30
    assert block.resized((4, 4), (8, 8)).in_spatial == 64                 # ordinary sizes still work
