"""lung_nodule_ct_detection's feature extractor from MONAI blocks alone, where torchvision is missing.

MONAI's ``resnet_fpn_feature_extractor`` (what the published config calls)
wraps the ResNet50 backbone in torchvision's ``IntermediateLayerGetter``; the
CPU build of torch here has no working torchvision.  :class:`ResNetFPN`
computes the same thing with the same parameters (layers 1 and 2 of the
backbone into MONAI's ``FeaturePyramidNetwork`` with 256 channels and a last
max-pool level, so three feature maps for the bundle's three anchor scales).
It is imported by a derived copy of the bundle's config (``tests.zoo_bundles.detection_copy``).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
from monai.networks.nets.resnet import ResNet


class ResNetFPN(torch.nn.Module):
    """ResNet layers 1 and 2 through an FPN: ``resnet_fpn_feature_extractor(b, 3, False, [1, 2])``."""

    def __init__(self, backbone: ResNet, spatial_dims: int = 3) -> None:
        super().__init__()
        self.backbone = backbone
        stage2 = backbone.in_planes // 8
        self.fpn = FeaturePyramidNetwork(
            spatial_dims, [stage2, stage2 * 2], 256, extra_blocks=LastLevelMaxPool(spatial_dims)
        )
        self.out_channels = 256

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        b = self.backbone
        x = b.act(b.bn1(b.conv1(x)))
        if not b.no_max_pool:
            x = b.maxpool(x)
        first = b.layer1(x)
        second = b.layer2(first)
        return self.fpn(OrderedDict([("0", first), ("1", second)]))
