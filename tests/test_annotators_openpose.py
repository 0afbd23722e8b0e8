"""OpenPose body annotator against controlnet_aux (lllyasviel's annotator code): the network on the same random
weights, the keypoint grouping on the same heatmaps and PAFs, the stick-figure drawing on the same keypoints, and
the whole detector."""

import math

import numpy as np
import pytest
import torch

import sdlite.adapters.annotators as ann
from sdlite.adapters.annotators import openpose
from sdlite.adapters.annotators.draw import draw_bodypose
from sdlite.adapters.annotators.openpose import BodyPoseNet
from sdlite.errors import CheckpointError

import cv2  # noqa: E402,F401  (controlnet_aux needs it; a missing reference fails, never skips)
import controlnet_aux.open_pose as aux_pose  # noqa: E402
from controlnet_aux.open_pose import util as aux_util  # noqa: E402
from controlnet_aux.open_pose.body import Body, Keypoint  # noqa: E402
from controlnet_aux.open_pose.model import bodypose_model  # noqa: E402

# A standing person in low-resolution (network output) pixels, relative to (centre x, top): COCO-18 order.
TEMPLATE = [(0, 2), (0, 5), (-3, 5), (-5, 9), (-6, 12), (3, 5), (5, 9), (6, 12), (-2, 12), (-2, 16), (-2, 20),
            (2, 12), (2, 16), (2, 20), (-1, 1), (1, 1), (-2, 1.5), (2, 1.5)]


def synthetic_outputs(people, h8, w8):
    """Network outputs a trained model would give for these people: Gaussian keypoint heatmaps and unit vectors
    along every limb in its two PAF channels (background heatmap = 1 − max)."""
    heat, paf = np.zeros((19, h8, w8)), np.zeros((38, h8, w8))
    yy, xx = np.mgrid[0:h8, 0:w8].astype(float)
    for person in people:
        for k, p in enumerate(person):
            if p is not None:
                heat[k] = np.maximum(heat[k], np.exp(-((xx - p[0]) ** 2 + (yy - p[1]) ** 2) / (2 * 0.8 ** 2)))
        for (a, b), (cx, cy) in zip(openpose.LIMBS, openpose.PAF_CHANNELS):
            if person[a] is None or person[b] is None:
                continue
            (ax, ay), (bx, by) = person[a], person[b]
            length = math.hypot(bx - ax, by - ay)
            ux, uy = (bx - ax) / length, (by - ay) / length
            along, across = (xx - ax) * ux + (yy - ay) * uy, np.abs((xx - ax) * uy - (yy - ay) * ux)
            mask = (along >= -1) & (along <= length + 1) & (across <= 1.0)
            paf[cx][mask], paf[cy][mask] = ux, uy
    heat[18] = 1 - heat[:18].max(0)
    return torch.tensor(paf, dtype=torch.float32), torch.tensor(heat, dtype=torch.float32)


class Stub(torch.nn.Module):
    """Stands in for the network: returns fixed outputs for an input of the expected size."""

    def __init__(self, paf, heat):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.paf, self.heat = paf, heat

    def forward(self, x):
        assert x.shape[-2:] == (self.heat.shape[1] * 8, self.heat.shape[2] * 8)
        return self.paf[None], self.heat[None]


def two_people():
    # fractional offsets: no blob is symmetric about a pixel boundary, so no peak is a tie of two pixels that
    # float rounding could break either way
    jitter = np.random.default_rng(0).uniform(0.1, 0.4, (36, 2))
    first = [(11.3 + dx + jx, 1.2 + dy + jy) for (dx, dy), (jx, jy) in zip(TEMPLATE, jitter)]
    second = [(33.2 + dx + jx, 1.6 + dy + jy) for (dx, dy), (jx, jy) in zip(TEMPLATE, jitter[18:])]
    second[7] = None  # left wrist hidden
    return synthetic_outputs([first, second], 23, 46)


def reference_body(net):
    body = Body.__new__(Body)
    body.model = net
    return body


def test_grouping_matches_controlnet_aux():
    stub = Stub(*two_people())
    bgr = np.zeros((384, 768, 3), dtype=np.uint8)  # 0.5·368/384 → network input 184 x 368 → outputs 23 x 46
    cand_ref, subset_ref = reference_body(stub)(bgr)
    heatmaps, pafs = openpose.body_maps(stub, bgr)
    candidate, subset = openpose.group(openpose.find_peaks(heatmaps), pafs, 384)
    assert candidate.shape == cand_ref.shape and np.allclose(candidate, cand_ref, atol=1e-5)
    assert subset.shape == subset_ref.shape == (2, 20)
    assert np.array_equal(subset[:, :18], subset_ref[:, :18]) and np.allclose(subset[:, 18:], subset_ref[:, 18:])
    assert sorted(subset[:, 19]) == [17, 18]


def test_detector_matches_controlnet_aux():
    stub = Stub(*two_people())
    detector = aux_pose.OpenposeDetector(reference_body(stub))
    src = np.random.default_rng(0).integers(0, 256, (384, 768, 3), dtype=np.uint8)
    theirs = detector(src, detect_resolution=384, image_resolution=384, output_type="np")
    ours = ann.annotate("openpose", src, stub, detect_resolution=384)
    assert ours.shape == theirs.shape == (384, 768, 3)
    assert len(np.unique(theirs.reshape(-1, 3), axis=0)) > 20  # two coloured figures
    assert np.array_equal(ours, theirs)
    # resized output (the map bilinearly to 512 x 1024): OpenCV's fixed point vs float, at most one level
    theirs = detector(src, detect_resolution=384, image_resolution=512, output_type="np")
    ours = ann.annotate("openpose", src, stub, detect_resolution=384, image_resolution=512)
    assert ours.shape == theirs.shape and np.abs(ours.astype(int) - theirs).max() <= 1


def test_drawing_matches_controlnet_aux():
    rng = np.random.default_rng(0)
    for trial in range(40):
        h, w = (256, 320) if trial % 2 else (384, 256)
        # keypoints anywhere, a few outside the canvas (clipped limbs), some missing
        kps = [None if rng.random() < 0.15 else (rng.integers(-40, w + 40) / w, rng.integers(-40, h + 40) / h)
               for _ in range(18)]
        ours = draw_bodypose(np.zeros((h, w, 3), np.uint8), kps)
        theirs = aux_util.draw_bodypose(np.zeros((h, w, 3), np.uint8),
                                        [None if k is None else Keypoint(*k) for k in kps])
        assert np.array_equal(ours, theirs), trial


def test_network_matches_controlnet_aux(tmp_path):
    torch.manual_seed(0)
    ref = bodypose_model().eval()
    g = torch.Generator().manual_seed(1)
    for p in ref.parameters():  # He-scaled weights, nonzero biases
        p.data = (torch.randn(p.shape, generator=g) * ((2.0 / p[0].numel()) ** 0.5 if p.ndim == 4 else 0.1))
    # the published file has flat keys (conv1_1.weight); the reference nests them (model0.conv1_1.weight)
    state = {k.split(".", 1)[1]: v for k, v in ref.state_dict().items()}
    torch.save(state, tmp_path / "body_pose_model.pth")
    net = ann.load(tmp_path / "body_pose_model.pth", kind="openpose")
    assert isinstance(net, BodyPoseNet) and net.kind == "openpose"
    x = torch.rand(1, 3, 48, 40) - 0.5
    with torch.no_grad():
        (paf, heat), (paf_ref, heat_ref) = net(x), ref(x)
    assert paf.shape == paf_ref.shape == (1, 38, 6, 5) and heat.shape == heat_ref.shape == (1, 19, 6, 5)
    for a, b in ((paf, paf_ref), (heat, heat_ref)):
        assert ((a - b).norm() / b.norm()).item() < 1e-5 and b.std() > 0

    with pytest.raises(CheckpointError, match="is a openpose annotator, not the hed one"):
        ann.load(tmp_path / "body_pose_model.pth", kind="hed")
    torch.save({"conv6_2_CPM.weight": torch.zeros(22, 512, 1, 1)}, tmp_path / "hand_pose_model.pth")
    with pytest.raises(CheckpointError, match="OpenPose hand model"):
        ann.load(tmp_path / "hand_pose_model.pth")
