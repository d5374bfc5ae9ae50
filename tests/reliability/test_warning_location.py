"""A fallback warning names the user's line (the caller's file), not a line inside rga_triton or
torch.nn: through RGAModule.__call__, a module hierarchy, and relation_maps."""
from __future__ import annotations

import warnings

import torch

import rga_triton
from rga_triton import dispatch


def _warnings_of(call, monkeypatch) -> list[warnings.WarningMessage]:
    monkeypatch.setenv("TRITON_INTERPRET", "0")          # CPU tensors then fall back to the torch path
    monkeypatch.setattr(dispatch, "_warned_reasons", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [w for w in caught if "using the 'torch' backend" in str(w.message)]


def test_fallback_warning_names_the_callers_line(monkeypatch):
    block = rga_triton.RGAModule(32, 16, cha_ratio=4, spa_ratio=4, down_ratio=4).eval()
    x = torch.randn(1, 32, 4, 4)
    nested = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Sequential(block))
    for call in (lambda: block(x), lambda: nested(x),
                 lambda: rga_triton.relation_maps(block, x, [0])):
        caught = _warnings_of(call, monkeypatch)
        assert caught and all(w.filename == __file__ for w in caught), [(w.filename, w.lineno) for w in caught]
