"""HED and lineart annotators against controlnet_aux (lllyasviel's annotator code) on the same random weights: the
networks, the whole detectors (resolution rules, post-processing), OpenCV's resize filters, and file refusal."""

import numpy as np
import pytest
import torch

import sdlite.adapters.annotators as ann
from sdlite.adapters.annotators import resample
from sdlite.adapters.annotators.edges import ControlNetHED, LineartGenerator
from sdlite.errors import CheckpointError

import cv2  # noqa: E402  (references: a missing one fails, never skips)
import controlnet_aux.hed as aux_hed  # noqa: E402
import controlnet_aux.lineart as aux_lineart  # noqa: E402


def rel(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return ((a - b).norm() / b.norm()).item()


def random_state(module, seed, gain=1.0):
    """He-scaled random weights (biases and 1-d parameters small but nonzero), so no layer is trivially zero."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in module.state_dict().items():
        if v.ndim >= 2:
            fan_in = v[0].numel() if not k.startswith("model3") else v.shape[0] * v[0, 0].numel()
            out[k] = torch.randn(v.shape, generator=g) * gain * (2.0 / fan_in) ** 0.5
        else:
            out[k] = torch.randn(v.shape, generator=g) * 0.1
    return out


def image(h, w, seed=0):
    """A smooth random picture (shapes, not noise), uint8 RGB."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    big = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    return np.clip(big.astype(int) + rng.integers(-8, 9, big.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("kind", ["area", "linear", "lanczos4"])
@pytest.mark.parametrize("size", [(20, 15), (106, 74), (128, 64), (53, 74)])
def test_resize_matches_opencv(kind, size):
    flag = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "lanczos4": cv2.INTER_LANCZOS4}[kind]
    src = image(37, 53)
    ours, theirs = resample.resize(src, *size, kind), cv2.resize(src, size, interpolation=flag)
    # uint8: OpenCV computes in fixed point, we in float: at most one level apart
    assert ours.shape == theirs.shape and np.abs(ours.astype(int) - theirs).max() <= 1
    f = src.astype(np.float32)
    assert np.abs(resample.resize(f, *size, kind) - cv2.resize(f, size, interpolation=flag)).max() < 1e-3


def test_resize_image_size_rule():
    from controlnet_aux.util import resize_image as aux_resize
    for h, w in [(100, 150), (512, 512), (333, 700), (1024, 600)]:
        src = image(h, w)
        for res in (256, 512):
            assert resample.resize_image(src, res).shape == aux_resize(src, res).shape


def test_hed_network_matches_controlnet_aux():
    net = ControlNetHED()
    net.load_state_dict(random_state(net, 0))
    ref = aux_hed.ControlNetHED_Apache2()
    ref.load_state_dict(net.state_dict())  # same keys: the file's
    x = torch.rand(1, 3, 64, 48) * 255
    with torch.no_grad():
        for a, b in zip(net(x), ref(x)):
            assert a.shape == b.shape and rel(a, b) < 1e-5


@pytest.mark.parametrize("safe", [False, True])
def test_hed_detector_matches_controlnet_aux(safe):
    net = ControlNetHED()
    state = random_state(net, 1)
    state["block1.convs.0.weight"] /= 100  # the input is 0..255
    state["norm"] = torch.full((1, 3, 1, 1), 120.0)
    net.load_state_dict(state)
    ref = aux_hed.HEDdetector(aux_hed.ControlNetHED_Apache2())
    ref.netNetwork.load_state_dict(net.state_dict())
    src = image(64, 128)  # at the detection size: the 64-multiple resizes are identities
    ours = ann.annotate("softedge_hedsafe" if safe else "softedge_hed", src, net, detect_resolution=64)
    theirs = ref(src, detect_resolution=64, image_resolution=64, safe=safe, output_type="np")
    assert ours.shape == theirs.shape == (64, 128, 3)
    assert theirs.std() > 5  # a map with edges, not a constant
    # the mean of the side outputs is truncated to uint8: float rounding may move a pixel by one level
    assert np.abs(ours.astype(int) - theirs).max() <= 1 and (ours != theirs).mean() < 1e-3

    if safe:
        return
    # a size that needs resizing both ways (Lanczos up to 64 x 128, then the map bilinearly to 128 x 192)
    src = image(50, 90, seed=2)
    ours = ann.annotate("softedge_hed", src, net, detect_resolution=64, image_resolution=128)
    theirs = ref(src, detect_resolution=64, image_resolution=128, safe=False, output_type="np")
    assert ours.shape == theirs.shape == (128, 256, 3)
    assert np.abs(ours.astype(int) - theirs).mean() < 1.0


def test_lineart_network_matches_controlnet_aux():
    net = LineartGenerator(3)
    net.load_state_dict(random_state(net, 3))
    ref = aux_lineart.Generator(3, 1, 3)
    ref.load_state_dict(net.state_dict())
    x = torch.rand(1, 3, 32, 48)
    with torch.no_grad():
        a, b = net(x), ref(x)
    assert a.shape == b.shape == (1, 1, 32, 48) and rel(a, b) < 1e-5 and b.std() > 1e-3


@pytest.mark.parametrize("coarse", [False, True])
def test_lineart_detector_matches_controlnet_aux(coarse):
    nets = [LineartGenerator(3), LineartGenerator(3)]
    for i, n in enumerate(nets):
        n.load_state_dict(random_state(n, 10 + i))
    refs = [aux_lineart.Generator(3, 1, 3), aux_lineart.Generator(3, 1, 3)]
    for r, n in zip(refs, nets):
        r.load_state_dict(n.state_dict())
    detector = aux_lineart.LineartDetector(refs[0].eval(), refs[1].eval())
    src = image(64, 128, seed=4)
    ours = ann.annotate("lineart_coarse" if coarse else "lineart_realistic", src, nets[coarse], detect_resolution=64)
    theirs = detector(src, coarse=coarse, detect_resolution=64, image_resolution=64, output_type="np")
    assert ours.shape == theirs.shape == (64, 128, 3) and theirs.std() > 5
    assert np.abs(ours.astype(int) - theirs).max() <= 1 and (ours != theirs).mean() < 1e-3


def test_files_load_and_wrong_files_are_refused(tmp_path):
    net = LineartGenerator(3)
    state = random_state(net, 5)
    torch.save(state, tmp_path / "sk_model2.pth")
    loaded = ann.load(tmp_path / "sk_model2.pth")
    assert loaded.kind == "lineart" and torch.equal(loaded.model0[1].weight, state["model0.1.weight"])
    assert ann.find("lineart_coarse", ["/nonexistent", tmp_path]).name == "sk_model2.pth"
    assert ann.network_for("lineart_coarse", [tmp_path]) is ann.network_for("lineart_coarse", [tmp_path])
    with pytest.raises(FileNotFoundError, match="sk_model.pth"):
        ann.find("lineart_realistic", [tmp_path])
    with pytest.raises(CheckpointError, match="is a lineart annotator, not the hed one"):
        ann.load(tmp_path / "sk_model2.pth", kind="hed")

    torch.save({"moduleVggOne.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "network-bsds500.pth")
    with pytest.raises(CheckpointError, match="original BGR HED"):
        ann.load(tmp_path / "network-bsds500.pth")
    torch.save({"first_stage_model.x": torch.zeros(1)}, tmp_path / "vae.pth")
    with pytest.raises(CheckpointError, match="not a HED.*first_stage_model.x"):
        ann.load(tmp_path / "vae.pth")
    hed_state = ControlNetHED().state_dict()
    hed_state["block3.convs.2.weight"] = torch.zeros(256, 128, 3, 3)
    torch.save(hed_state, tmp_path / "ControlNetHED.pth")
    with pytest.raises(CheckpointError, match=r"block3\.convs\.2\.weight.*\[256, 128, 3, 3\].*\[256, 256, 3, 3\]"):
        ann.load(tmp_path / "ControlNetHED.pth")
