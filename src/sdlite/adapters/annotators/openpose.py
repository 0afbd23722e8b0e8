"""OpenPose body keypoints as the openpose ControlNet saw them (lllyasviel's annotator, kept by controlnet_aux as
``OpenposeDetector`` with body only): the network on the image, keypoint peaks, their grouping into people by part
affinity fields (Cao et al. 2017), and the coloured stick figure (``draw``).

Inference (one scale): the BGR image resized so its height is 0.5·368 px (area when shrinking, Lanczos-4 when
growing), padded right and bottom with 128 to a multiple of 8, scaled to x/256 − 0.5; both outputs are enlarged x8
(Lanczos-4), cropped of the padding and resized to the image size.

Peaks: each keypoint heatmap smoothed by a Gaussian (sigma 3, truncated at 4 sigma, mirrored edges); a peak is
>= its four neighbours (outside counts as 0) and > 0.1; its score is the unsmoothed heatmap there.

Grouping, for each of the 19 limbs (pairs of keypoints, in a fixed order): every pair of candidate peaks is scored by
the limb's PAF sampled at 10 points between them (rounded to pixels) projected on their unit direction; the pair
qualifies when more than 8 samples exceed 0.05 and mean + min(0.5·H / length − 1, 0) > 0; pairs are taken greedily
by that score, each peak once per limb, at most min(#A, #B). People are built limb by limb: a connection joins the
person holding either end, merges two people that share no keypoint, or (for the first 17 limbs) starts a new one.
People with fewer than 4 keypoints or a mean score below 0.4 are dropped.

The network (``BodyPoseNet``): the body model of Cao et al. 2017, "Realtime Multi-Person 2D Pose Estimation using
Part Affinity Fields" (the COCO 18-keypoint Caffe model, as ``body_pose_model.pth`` in lllyasviel/Annotators).
Layers carry the file's flat names (``conv1_1``, ``conv5_3_CPM_L2``, ``Mconv4_stage3_L1`` …). A VGG-19 front
(conv1_1 … conv4_2, three 2x2 max-pools: stride 8) and two reducing convs (conv4_3_CPM, conv4_4_CPM: 128 channels of
features F) feed six stages of two branches: L1 predicts 38 part-affinity-field channels (19 limbs × (x, y)), L2
predicts 19 heatmaps (18 keypoints + background). Stage 1 sees F (three 3x3 convs, then two 1x1); stages 2-6 see the
previous stage's two outputs concatenated with F (185 channels; five 7x7 convs, then two 1x1). ReLU follows every conv
except each branch's last — with one exception kept from the annotator ControlNet was trained with: its list of
layers without ReLU names ``Mconv7_stage6_L1`` twice and omits ``Mconv7_stage6_L2``, so the final heatmaps pass
through a ReLU.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .draw import draw_bodypose
from .resample import AREA, LANCZOS4, LINEAR, hwc3, resize, resize_image

BOX = 368
STRIDE = 8
PAD_VALUE = 128
PEAK_THRESHOLD = 0.1
PAF_THRESHOLD = 0.05
SAMPLES = 10
# Limbs as (keypoint, keypoint), 0-based COCO-18 order (nose, neck, r-shoulder, r-elbow, r-wrist, l-shoulder, …,
# r-eye, l-eye, r-ear, l-ear), and the PAF channels (x, y) of each.
LIMBS = [(1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
         (1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (2, 16), (5, 17)]
PAF_CHANNELS = [(12, 13), (20, 21), (14, 15), (16, 17), (22, 23), (24, 25), (0, 1), (2, 3), (4, 5), (6, 7), (8, 9),
                (10, 11), (28, 29), (30, 31), (34, 35), (32, 33), (36, 37), (18, 19), (26, 27)]
NEW_PERSON_LIMBS = 17  # the two ear-shoulder limbs only join existing people



FRONT = [("conv1_1", 3, 64), ("conv1_2", 64, 64), "pool", ("conv2_1", 64, 128), ("conv2_2", 128, 128), "pool",
         ("conv3_1", 128, 256), ("conv3_2", 256, 256), ("conv3_3", 256, 256), ("conv3_4", 256, 256), "pool",
         ("conv4_1", 256, 512), ("conv4_2", 512, 512), ("conv4_3_CPM", 512, 256), ("conv4_4_CPM", 256, 128)]
FEATURES = 128
OUTPUTS = {1: 38, 2: 19}  # branch L1: part affinity fields, branch L2: heatmaps
STAGES = 6


def _branch_layers(stage: int, branch: int) -> list[tuple[str, int, int, int]]:
    """(name, in, out, kernel) of one branch of one stage."""
    out = OUTPUTS[branch]
    if stage == 1:
        names = [f"conv5_{i}_CPM_L{branch}" for i in range(1, 6)]
        return [(names[0], FEATURES, 128, 3), (names[1], 128, 128, 3), (names[2], 128, 128, 3),
                (names[3], 128, 512, 1), (names[4], 512, out, 1)]
    names = [f"Mconv{i}_stage{stage}_L{branch}" for i in range(1, 8)]
    cin = FEATURES + sum(OUTPUTS.values())
    return ([(names[0], cin, 128, 7)] + [(n, 128, 128, 7) for n in names[1:5]]
            + [(names[5], 128, 128, 1), (names[6], 128, out, 1)])


class BodyPoseNet(nn.Module):
    """forward(x [B, 3, H, W] BGR scaled to x/256 − 0.5) → (pafs [B, 38, H/8, W/8], heatmaps [B, 19, H/8, W/8])."""

    def __init__(self):
        super().__init__()
        for layer in FRONT:
            if layer != "pool":
                name, cin, cout = layer
                setattr(self, name, nn.Conv2d(cin, cout, 3, padding=1))
        for stage in range(1, STAGES + 1):
            for branch in OUTPUTS:
                for name, cin, cout, k in _branch_layers(stage, branch):
                    setattr(self, name, nn.Conv2d(cin, cout, k, padding=k // 2))

    def _branch(self, x: torch.Tensor, stage: int, branch: int) -> torch.Tensor:
        layers = _branch_layers(stage, branch)
        for i, (name, *_rest) in enumerate(layers):
            x = getattr(self, name)(x)
            if i < len(layers) - 1 or (stage, branch) == (STAGES, 2):
                x = F.relu(x)
        return x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for layer in FRONT:
            x = F.max_pool2d(x, 2, 2) if layer == "pool" else F.relu(getattr(self, layer[0])(x))
        features = x
        for stage in range(1, STAGES + 1):
            pafs, heatmaps = self._branch(x, stage, 1), self._branch(x, stage, 2)
            x = torch.cat([pafs, heatmaps, features], 1)
        return pafs, heatmaps

def _fit(x: np.ndarray, width: int, height: int) -> np.ndarray:
    """The annotator's resize: area when the size shrinks (by the sum of sides), Lanczos-4 otherwise."""
    h, w = x.shape[:2]
    return resize(x, width, height, AREA if (width + height) / (w + h) < 1 else LANCZOS4)


@torch.no_grad()
def body_maps(net: BodyPoseNet, bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps [H, W, 19] and PAFs [H, W, 38] (float64) of a uint8 BGR image [H, W, 3]."""
    h, w = bgr.shape[:2]
    scale = 0.5 * BOX / h
    small = _fit(bgr, int(w * scale), int(h * scale))
    sh, sw = small.shape[:2]
    pad_h, pad_w = -sh % STRIDE, -sw % STRIDE
    padded = np.pad(small, ((0, pad_h), (0, pad_w), (0, 0)), constant_values=PAD_VALUE)
    param = next(net.parameters())
    x = torch.from_numpy(padded.astype(np.float32) / 256 - 0.5).permute(2, 0, 1)[None].to(param)
    pafs, heatmaps = (t[0].permute(1, 2, 0).float().cpu().numpy() for t in net(x))
    maps = []
    for m in (heatmaps, pafs):
        m = _fit(m, m.shape[1] * STRIDE, m.shape[0] * STRIDE)[:sh, :sw]
        maps.append(_fit(m, w, h).astype(np.float64))
    return maps[0], maps[1]


def _gaussian(x: np.ndarray, sigma: float = 3.0, truncate: float = 4.0) -> np.ndarray:
    radius = int(truncate * sigma + 0.5)
    t = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * t * t / (sigma * sigma))
    kernel /= kernel.sum()
    for axis in (0, 1):
        padded = np.pad(x, [(radius, radius) if a == axis else (0, 0) for a in range(2)], mode="symmetric")
        n = x.shape[axis]
        x = sum(kernel[i] * np.take(padded, np.arange(i, i + n), axis=axis) for i in range(len(kernel)))
    return x


def find_peaks(heatmaps: np.ndarray) -> list[list[tuple[int, int, float, int]]]:
    """Per keypoint, its peaks as (x, y, score, id); ids count up over all keypoints in order."""
    peaks, counter = [], 0
    for part in range(18):
        raw = heatmaps[:, :, part]
        s = _gaussian(raw)
        p = np.pad(s, 1)
        is_peak = ((s >= p[:-2, 1:-1]) & (s >= p[2:, 1:-1]) & (s >= p[1:-1, :-2]) & (s >= p[1:-1, 2:])
                   & (s > PEAK_THRESHOLD))
        ys, xs = np.nonzero(is_peak)
        peaks.append([(int(x), int(y), float(raw[y, x]), counter + i) for i, (x, y) in enumerate(zip(xs, ys))])
        counter += len(xs)
    return peaks


def _connections(peaks, pafs: np.ndarray, height: int) -> list[np.ndarray | None]:
    """Per limb, the accepted connections as rows (id A, id B, score, index in A, index in B); None when a side has
    no peak."""
    out = []
    for (a, b), (cx, cy) in zip(LIMBS, PAF_CHANNELS):
        cand_a, cand_b = peaks[a], peaks[b]
        if not cand_a or not cand_b:
            out.append(None)
            continue
        scored = []
        for i, pa in enumerate(cand_a):
            for j, pb in enumerate(cand_b):
                vx, vy = pb[0] - pa[0], pb[1] - pa[1]
                norm = max(0.001, math.sqrt(vx * vx + vy * vy))
                xs = np.rint(np.linspace(pa[0], pb[0], num=SAMPLES)).astype(int)
                ys = np.rint(np.linspace(pa[1], pb[1], num=SAMPLES)).astype(int)
                along = pafs[ys, xs, cx] * (vx / norm) + pafs[ys, xs, cy] * (vy / norm)
                score = sum(along.tolist()) / SAMPLES + min(  # summed in order, as the reference does
                    0.5 * height / norm - 1, 0)
                if np.count_nonzero(along > PAF_THRESHOLD) > 0.8 * SAMPLES and score > 0:
                    scored.append((i, j, score))
        scored.sort(key=lambda c: c[2], reverse=True)  # stable: ties keep (i, j) order
        rows, used_a, used_b = [], set(), set()
        for i, j, score in scored:
            if i not in used_a and j not in used_b:
                rows.append((cand_a[i][3], cand_b[j][3], score, i, j))
                used_a.add(i)
                used_b.add(j)
                if len(rows) >= min(len(cand_a), len(cand_b)):
                    break
        out.append(np.array(rows, dtype=np.float64).reshape(-1, 5))
    return out


def group(peaks, pafs: np.ndarray, height: int) -> tuple[np.ndarray, np.ndarray]:
    """People from peaks and PAFs: (candidate [N, 4] rows (x, y, score, id), subset [P, 20]: per person the
    candidate index of each of the 18 keypoints or −1, then the total score and the keypoint count)."""
    candidate = np.array([p for part in peaks for p in part], dtype=np.float64).reshape(-1, 4)
    people = np.zeros((0, 20))
    for k, rows in enumerate(_connections(peaks, pafs, height)):
        if rows is None:
            continue
        a, b = LIMBS[k]
        for id_a, id_b, score, *_ in rows:
            holders = [p for p in range(len(people)) if people[p][a] == id_a or people[p][b] == id_b][:2]
            if len(holders) == 2:
                p1, p2 = holders
                shared = ((people[p1] >= 0).astype(int) + (people[p2] >= 0).astype(int))[:-2] == 2
                if not shared.any():
                    people[p1][:-2] += people[p2][:-2] + 1
                    people[p1][-2:] += people[p2][-2:]
                    people[p1][-2] += score
                    people = np.delete(people, p2, 0)
                    continue
            if holders:
                p = holders[0]
                if len(holders) == 2 or people[p][b] != id_b:
                    people[p][b] = id_b
                    people[p][-1] += 1
                    people[p][-2] += candidate[int(id_b), 2] + score
            elif k < NEW_PERSON_LIMBS:
                row = -np.ones(20)
                row[a], row[b] = id_a, id_b
                row[-1] = 2
                row[-2] = candidate[int(id_a), 2] + candidate[int(id_b), 2] + score
                people = np.vstack([people, row])
    keep = [p for p in range(len(people)) if people[p][-1] >= 4 and people[p][-2] / people[p][-1] >= 0.4]
    return candidate, people[keep]


def keypoints(candidate: np.ndarray, people: np.ndarray, width: int, height: int) -> list[list]:
    """Per person, 18 keypoints as (x / width, y / height) or None."""
    return [[None if i < 0 else (candidate[i][0] / float(width), candidate[i][1] / float(height))
             for i in person[:18].astype(int)] for person in people]


def detect(net: BodyPoseNet, image: np.ndarray, detect_resolution: int = 512,
           image_resolution: int = 512) -> np.ndarray:
    """The pose map, uint8 [H, W, 3]: every person's stick figure on black (controlnet_aux ``OpenposeDetector``,
    body only)."""
    image = resize_image(hwc3(image), detect_resolution)
    h, w = image.shape[:2]
    heatmaps, pafs = body_maps(net, image[:, :, ::-1].copy())
    candidate, people = group(find_peaks(heatmaps), pafs, h)
    canvas = np.zeros((h, w, 3), dtype=np.uint8)
    for person in keypoints(candidate, people, w, h):
        draw_bodypose(canvas, person)
    out_h, out_w = resize_image(image, image_resolution).shape[:2]
    return resize(canvas, out_w, out_h, LINEAR)
