"""Issue 26: files from elsewhere (a checkpoint someone shares, torch.hub's download cache) are data,
never code; a crafted file cannot hang the loader or make it allocate without bound; a damaged one gets
one clear error that names it."""
from __future__ import annotations

import io
import os
import random
import re

import pytest
import torch
import torch.nn as nn

import rga_triton
from rga_triton.integrations import _weights
from rga_triton.models import rga_net
from rga_triton.resize import POSITION_INPUTS

TINY = dict(height=64, width=32, spa_ratio=2, down_ratio=2)     # 16x8 first map: 128 positions, 64 rows


class Poison:
    """Unpickling it creates the folder ``marker``: proof that a load ran code from the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def write(path, data: bytes):
    path.write_bytes(data)
    return path


def saved(obj, legacy=False) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


def linear_state():
    torch.manual_seed(0)
    return nn.Linear(4, 3).state_dict()


# ------------------------------------------------------------------ torch.hub's cache: tensors only

@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """A private $TORCH_HOME holding the cache folder; its file exists, so torch.hub never downloads."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)           # no torch.hub.set_dir() from elsewhere
    folder = tmp_path / "torch_home" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    return folder / os.path.basename(_weights.IMAGENET_RESNET50_URL)


def test_poisoned_cached_imagenet_weights_run_no_code(torch_home, tmp_path):
    marker = tmp_path / "code_ran"
    import pickle
    torch_home.write_bytes(pickle.dumps(Poison(marker), protocol=2))
    with pytest.raises(ValueError, match=re.escape(str(torch_home))):
        _weights.load_imagenet_resnet50(nn.Module())
    assert not marker.exists(), "unpickling the cached file ran code"


def test_clean_cached_imagenet_weights_still_load(torch_home, monkeypatch):
    state = linear_state()
    torch_home.write_bytes(saved(state))
    got = {}
    monkeypatch.setattr("rga_triton.models.load_backbone_weights", lambda backbone, s: got.update(s))
    _weights.load_imagenet_resnet50(nn.Module())
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)


# ------------------------------------------------------------------ crafted checkpoints

def test_self_referential_checkpoint_is_refused_not_followed_forever(tmp_path):
    looped = {"epoch": 3}
    looped["state_dict"] = looped                   # 1 KB on disk; weights_only=True reads it
    path = tmp_path / "looped.pth"
    torch.save(looped, path)
    with pytest.raises(ValueError, match="refer back to themselves"):
        rga_triton.load_checkpoint(nn.Linear(4, 3), path)


def test_relation_rows_a_file_claims_are_bounded_by_the_models_sizes(tmp_path):
    """Stride-0 tensors claim 6000 relation rows in a 2.5 KB file: with source_size= the loader would
    rebuild the block for 6000 rows (its W_spatial grows as their square) before any check."""
    model = rga_net(5, backend="torch", **TINY)
    crafted = {f"backbone.rga_att1.{part}.0.weight": torch.zeros(()).expand(6000, maps * 128, 1, 1)
               for part, maps in POSITION_INPUTS.items()}
    path = tmp_path / "crafted.pth"
    torch.save(crafted, path)
    assert path.stat().st_size < 4000
    with pytest.raises(ValueError, match=r"'backbone\.rga_att1\.\w+\.0\.weight' has 6000 relation rows.* at most 128"):
        rga_triton.load_checkpoint(model, path, strict=False, source_size=(64, 32))
    assert model.backbone.rga_att1.inter_spatial == 64            # nothing was rebuilt


def test_non_string_keys_are_a_clear_error():
    with pytest.raises(ValueError, match=r"keys that are not strings: 0 \(int\)"):
        rga_triton.load_checkpoint(nn.Linear(4, 3), {0: torch.zeros(3)})
    with pytest.raises(ValueError, match=r"under 'state_dict' has keys that are not strings"):
        rga_triton.load_checkpoint(nn.Linear(4, 3), {"state_dict": {"weight": torch.zeros(3, 4), 1: torch.zeros(3)}})


# ------------------------------------------------------------------ damaged files: one clear error

def _damaged():
    """name -> bytes of a file that is not a readable checkpoint (each gave torch's raw error before)."""
    zipped, legacy = saved(linear_state()), saved(linear_state(), legacy=True)
    return {
        "empty": b"",                                            # EOFError
        "zip cut short": zipped[: len(zipped) // 2],             # RuntimeError (failed finding central directory)
        "zip cut at 100 bytes": zipped[:100],
        "legacy cut in its pickles": legacy[:100],               # EOFError
        "legacy cut in its storages": legacy[:-10],              # RuntimeError (unexpected EOF)
        "random bytes": random.Random(0).randbytes(1000),       # the weights_only=False advice, misleading
        "text": b"not a checkpoint\n",                           # KeyError
    }


@pytest.mark.parametrize("name", list(_damaged()))
def test_damaged_checkpoint_is_named_and_called_unreadable(tmp_path, name):
    path = write(tmp_path / "damaged.pth", _damaged()[name])
    with pytest.raises(ValueError, match=rf"{re.escape(repr(str(path)))} is not a readable PyTorch checkpoint"):
        rga_triton.load_checkpoint(nn.Linear(4, 3), path)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_sound_files_keep_their_own_errors(tmp_path, legacy):
    """A file that holds more than tensors keeps the weights_only advice; one torch cannot place keeps
    torch's words; a sound file loads."""
    import numpy as np

    state = linear_state()
    path = write(tmp_path / "numpy.pth", saved({"state_dict": state, "best": np.float64(0.5)}, legacy))
    with pytest.raises(RuntimeError, match="weights_only=False"):
        rga_triton.load_checkpoint(nn.Linear(4, 3), path)
    assert rga_triton.load_checkpoint(nn.Linear(4, 3), path, weights_only=False).ok
    path = write(tmp_path / "good.pth", saved(state, legacy))
    with pytest.raises(RuntimeError) as caught:
        rga_triton.load_checkpoint(nn.Linear(4, 3), path, map_location="cuda:99")
    assert "not a readable" not in str(caught.value)
    assert rga_triton.load_checkpoint(nn.Linear(4, 3), path).ok
