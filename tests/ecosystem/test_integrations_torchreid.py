"""torchreid (the real package): RGA-Net through its model factory, its engines and its evaluation.

torchreid's ImageSoftmaxEngine hands any tuple a model returns to DeepSupervision, which averages
the cross-entropy over every element: a model that returns (logits, features) in train mode
trains the wrong loss without a word. These tests run its real engines for a few iterations on a
tiny synthetic dataset written to a temporary folder and registered as a torchreid image dataset,
then its own test (feature extraction, ranking, mAP and CMC).
"""
import os

import pytest
import torch

torchreid = pytest.importorskip("torchreid")
pytest.importorskip("torchvision")

from PIL import Image  # noqa: E402  (torchvision's dependency)

import rga_triton.integrations.torchreid as rga_torchreid  # noqa: E402
from rga_triton.attach import attached  # noqa: E402
from rga_triton.models import RGANet  # noqa: E402

# A 64 x 32 input: every stage keeps a non-empty W network at ratio 2.
SIZE = dict(height=64, width=32)
RGA = dict(spa_ratio=2, down_ratio=2, backend="torch")
IDS, PER_ID = 4, 4
# torchreid's own models that get RGA (register() adds rga_<name> for its whole ResNet family and OSNet)
FAMILY = ("resnet50_fc512", "resnet101", "resnext50_32x4d", "resnet50_ibn_a", "osnet_x1_0")
DATASET = "rga_synthetic"


class SyntheticReID(torchreid.data.ImageDataset):
    """IDS identities, PER_ID train images each over two cameras; one query and two gallery images per id.

    Images are written under ``root`` (a temporary folder), one flat colour per identity plus noise.
    """

    def __init__(self, root="", **kwargs):
        generator = torch.Generator().manual_seed(0)
        folder = os.path.join(root, DATASET)
        os.makedirs(folder, exist_ok=True)

        def image(pid, index):
            path = os.path.join(folder, f"{pid:02d}_{index:02d}.jpg")
            if not os.path.exists(path):
                colour = torch.rand(3, 1, 1, generator=generator) * 200
                pixels = (colour + torch.rand(3, SIZE["height"], SIZE["width"], generator=generator) * 55)
                Image.fromarray(pixels.permute(1, 2, 0).byte().numpy()).save(path)
            return path

        train = [(image(pid, i), pid, i % 2, 0) for pid in range(IDS) for i in range(PER_ID)]
        query = [(image(pid, 10), pid, 0, 0) for pid in range(IDS)]
        gallery = [(image(pid, 10 + i), pid, 1, 0) for pid in range(IDS) for i in (1, 2)]
        super().__init__(train, query, gallery, **kwargs)


@pytest.fixture(scope="module")
def datamanagers(tmp_path_factory):
    """{"softmax": random sampling, "triplet": RandomIdentitySampler} over the synthetic dataset."""
    if DATASET not in torchreid.data.datasets.__image_datasets:     # noqa: SLF001 - a module global
        torchreid.data.register_image_dataset(DATASET, SyntheticReID)
    root = str(tmp_path_factory.mktemp("reid-data"))
    common = dict(root=root, sources=DATASET, batch_size_train=8, batch_size_test=4, workers=0, use_gpu=False,
                  transforms=["random_flip"], **SIZE)
    return {"softmax": torchreid.data.ImageDataManager(**common),
            "triplet": torchreid.data.ImageDataManager(train_sampler="RandomIdentitySampler", num_instances=2,
                                                       **common)}


@pytest.fixture(autouse=True)
def registered():
    names = rga_torchreid.register(**SIZE, **RGA)
    assert names[:3] == ["rga_net", "rga_net_s", "rga_net_c"]
    assert {f"rga_{name}" for name in FAMILY} <= set(names)


def test_build_model_follows_torchreids_conventions():
    x = torch.randn(2, 3, SIZE["height"], SIZE["width"])
    softmax = torchreid.models.build_model("rga_net", 5, loss="softmax", pretrained=False)
    triplet = torchreid.models.build_model("rga_net", 5, loss="triplet", pretrained=False)
    assert isinstance(softmax, RGANet) and "rga_net" in torchreid.models.__model_factory     # noqa: SLF001
    logits = softmax(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 5)
    logits, features = triplet(x)
    assert logits.shape == (2, 5) and features.shape == (2, 2048)
    # triplet features are the pooled map, before the BNNeck
    maps = triplet(x, return_featuremaps=True)
    assert maps.shape == (2, 2048, 4, 2)
    torch.testing.assert_close(features, maps.mean(dim=(2, 3)))
    for model in (softmax.eval(), triplet.eval()):
        with torch.no_grad():
            out = model(x)
            assert out.shape == (2, 2048)
            torch.testing.assert_close(out, model.feat_bn(model(x, return_featuremaps=True).mean(dim=(2, 3))))
    s = torchreid.models.build_model("rga_net_s", 3, pretrained=False)
    c = torchreid.models.build_model("rga_net_c", 3, pretrained=False)
    assert (s.backbone.rga_att1.use_spatial, s.backbone.rga_att1.use_channel) == (True, False)
    assert (c.backbone.rga_att1.use_spatial, c.backbone.rga_att1.use_channel) == (False, True)


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="loss"):
        torchreid.models.build_model("rga_net", 5, loss="arcface", pretrained=False)
    with pytest.raises(ValueError, match="height"):
        rga_torchreid.register(height=0)
    with pytest.raises(TypeError, match="use_channel"):
        rga_torchreid.register(use_channel=False)
    with pytest.raises(ValueError, match="overwrite"):
        rga_torchreid.register(overwrite=False, **SIZE, **RGA)


def test_pretrained_loads_torchvisions_imagenet_resnet50_from_the_hub_cache(tmp_path, monkeypatch):
    """build_model's default pretrained=True reads torchvision's resnet50 file where torch.hub caches it."""
    import torchvision

    from rga_triton.integrations._weights import IMAGENET_RESNET50_URL

    assert IMAGENET_RESNET50_URL == torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        source = torchvision.models.resnet50().state_dict()
        os.makedirs(tmp_path / "hub" / "checkpoints")
        torch.save(source, tmp_path / "hub" / "checkpoints" / os.path.basename(IMAGENET_RESNET50_URL))
        model = torchreid.models.build_model("rga_net", 5, loss="softmax")
    finally:
        torch.hub.set_dir(os.path.join(os.path.expanduser(os.environ.get("TORCH_HOME", "~/.cache/torch")), "hub"))
    torch.testing.assert_close(model.backbone.layer3[2].conv2.weight, source["layer3.2.conv2.weight"])


def test_deep_person_reid_layout_is_found(monkeypatch):
    """deep-person-reid's own layout has the factory in torchreid.models, not torchreid.reid.models."""
    import sys

    real = sys.modules["torchreid.reid.models"]
    monkeypatch.setitem(sys.modules, "torchreid.reid.models", None)       # import fails, as there
    monkeypatch.setitem(sys.modules, "torchreid.models", real)
    assert rga_torchreid.models_module() is real


def _spy_losses(engine):
    """Wrap engine.compute_loss: a list of (criterion, outputs, targets, loss) per call."""
    seen, compute = [], engine.compute_loss

    def spy(criterion, outputs, targets):
        loss = compute(criterion, outputs, targets)
        seen.append((criterion, outputs, targets, loss))
        return loss

    engine.compute_loss = spy
    return seen


def _spy_evaluation(engine):
    results, evaluate = [], engine._evaluate

    def spy(*args, **kwargs):
        results.append(evaluate(*args, **kwargs))
        return results[-1]

    engine._evaluate = spy
    return results


def _run(engine, tmp_path):
    engine.run(save_dir=str(tmp_path), max_epoch=1, print_freq=1, eval_freq=-1, ranks=[1, 5])   # an 8-image gallery
    return engine


def test_softmax_engine_trains_the_cross_entropy_of_the_logits_alone(datamanagers, tmp_path):
    dm = datamanagers["softmax"]
    torch.manual_seed(0)
    model = torchreid.models.build_model("rga_net", dm.num_train_pids, loss="softmax", pretrained=False)
    optimizer = torchreid.optim.build_optimizer(model, optim="adam", lr=3e-4)
    scheduler = torchreid.optim.build_lr_scheduler(optimizer, lr_scheduler="single_step", stepsize=20)
    engine = torchreid.engine.ImageSoftmaxEngine(dm, model, optimizer, scheduler=scheduler, use_gpu=False,
                                                 label_smooth=True)
    losses, evaluations = _spy_losses(engine), _spy_evaluation(engine)
    _run(engine, tmp_path)

    assert len(losses) == IDS * PER_ID // 8     # one epoch, drop_last
    reference = torchreid.losses.CrossEntropyLoss(num_classes=dm.num_train_pids, use_gpu=False, label_smooth=True)
    for _criterion, outputs, pids, loss in losses:
        assert isinstance(outputs, torch.Tensor) and outputs.shape == (8, dm.num_train_pids), type(outputs)
        assert torch.equal(loss, reference(outputs, pids))
    (rank1, mAP), = evaluations                  # its own test: features, ranking, CMC and mAP
    assert 0.0 <= rank1 <= 1.0 and 0.0 < mAP <= 1.0
    assert os.path.exists(tmp_path / "model" / "model.pth.tar-1")


def test_triplet_engine_takes_logits_and_pre_neck_features(datamanagers, tmp_path):
    dm = datamanagers["triplet"]
    torch.manual_seed(0)
    model = torchreid.models.build_model("rga_net", dm.num_train_pids, loss="triplet", pretrained=False)
    optimizer = torchreid.optim.build_optimizer(model, optim="adam", lr=3e-4)
    scheduler = torchreid.optim.build_lr_scheduler(optimizer, lr_scheduler="single_step", stepsize=20)
    engine = torchreid.engine.ImageTripletEngine(dm, model, optimizer, margin=0.3, weight_t=1, weight_x=1,
                                                 scheduler=scheduler, use_gpu=False)
    losses, evaluations = _spy_losses(engine), _spy_evaluation(engine)
    _run(engine, tmp_path)

    kinds = [type(criterion).__name__ for criterion, *_ in losses]
    assert kinds == ["TripletLoss", "CrossEntropyLoss"] * (IDS * PER_ID // 8)
    for criterion, outputs, _pids, loss in losses:
        width = 2048 if type(criterion).__name__ == "TripletLoss" else dm.num_train_pids
        assert isinstance(outputs, torch.Tensor) and outputs.shape == (8, width)
        assert torch.isfinite(loss)
    (rank1, mAP), = evaluations
    assert 0.0 <= rank1 <= 1.0 and 0.0 < mAP <= 1.0


@pytest.mark.parametrize("name", FAMILY)
def test_torchreids_own_models_with_rga_keep_its_conventions(name):
    """rga_<name> is torchreid's model with a block after each stage: its keys, its train/eval returns, and
    a backward that reaches every block."""
    torch.manual_seed(0)
    model = torchreid.models.build_model(f"rga_{name}", 3, loss="triplet", pretrained=False)
    plain = torchreid.models.build_model(name, 3, loss="triplet", pretrained=False)
    stages = rga_torchreid.stages_of(plain)
    assert list(attached(model)) == stages and len(stages) == (3 if name.startswith("osnet") else 4)
    assert set(plain.state_dict()) == {k for k in model.state_dict() if not k.startswith("rga_att")}
    x = torch.randn(2, 3, SIZE["height"], SIZE["width"])
    logits, features = model.train()(x)
    assert logits.shape == (2, 3) and features.shape == (2, plain.feature_dim)
    (logits.logsumexp(1).sum() + features.norm()).backward()
    assert all(getattr(model, block).gx_spatial[0].weight.grad.abs().sum() > 0 for block in attached(model).values())
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, plain.feature_dim)                       # eval: features
        maps = model.featuremaps(x)                                           # the maps include the blocks
        assert maps.shape[0] == 2 and maps.dim() == 4


def test_softmax_engine_trains_an_osnet_with_rga(datamanagers, tmp_path):
    dm = datamanagers["softmax"]
    torch.manual_seed(0)
    model = torchreid.models.build_model("rga_osnet_x1_0", dm.num_train_pids, loss="softmax", pretrained=False)
    optimizer = torchreid.optim.build_optimizer(model, optim="adam", lr=3e-4)
    scheduler = torchreid.optim.build_lr_scheduler(optimizer, lr_scheduler="single_step", stepsize=20)
    engine = torchreid.engine.ImageSoftmaxEngine(dm, model, optimizer, scheduler=scheduler, use_gpu=False)
    losses, evaluations = _spy_losses(engine), _spy_evaluation(engine)
    _run(engine, tmp_path)
    assert len(losses) == IDS * PER_ID // 8 and all(torch.isfinite(loss) for *_, loss in losses)
    (rank1, mAP), = evaluations
    assert 0.0 <= rank1 <= 1.0 and 0.0 < mAP <= 1.0
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, SIZE["height"], SIZE["width"]), return_featuremaps=True).shape[1] == 512
