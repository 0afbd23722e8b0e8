"""The OpenPose body network of Cao et al. 2017, "Realtime Multi-Person 2D Pose Estimation using Part Affinity
Fields" (the COCO 18-keypoint Caffe model, as ``body_pose_model.pth`` in lllyasviel/Annotators).

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

import torch
import torch.nn.functional as F
from torch import nn

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
