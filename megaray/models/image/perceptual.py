"""Optional perceptual reconstruction term: VGG16 feature distance from local weights.

LPIPS (Zhang et al. 2018, arXiv:1801.03924) compares unit-normalised VGG16 activations at
``relu1_2, relu2_2, relu3_3, relu4_3, relu5_3``. Its learned per-channel linear weights are a
separate download, so this is the paper's uncalibrated baseline: every channel weighted
equally, ``sum_l mean_{c,h,w} (f_l(x) / ||f_l(x)|| - f_l(y) / ||f_l(y)||)^2``. Nothing is
downloaded: the VGG16 weights come from a local torchvision ``vgg16`` state_dict file (the
whole model's, or only its ``features.*`` entries).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from megaray.errors import ConfigError

#: indices into ``torchvision.models.vgg16().features`` after which LPIPS taps the activations
_TAPS = (3, 8, 15, 22, 29)
#: ImageNet statistics VGG expects, for inputs mapped from [-1, 1] to [0, 1]
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class VGGPerceptualLoss(nn.Module):
    """``(x, y)`` images ``(B, 3, H, W)`` in ``[-1, 1]`` -> scalar distance (fp32); frozen weights.

    Raises:
        ConfigError: ``weights_path`` does not exist or is not a VGG16 state_dict (names the path).
    """

    def __init__(self, weights_path: str):
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        if not os.path.isfile(weights_path):
            raise ConfigError(
                f"model.lpips_vgg_path: {weights_path} does not exist; give a local torchvision "
                f"VGG16 state_dict (.pth) or set model.perceptual_weight=0"
            )
        with torch.device("meta"):  # vgg16().features without the classifier, filled from the file
            features = make_layers(cfgs["D"])[: _TAPS[-1] + 1]
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        try:  # the whole torchvision vgg16 state_dict, or only its ``features.*`` part
            features.load_state_dict(
                {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")},
                assign=True,
            )
        except (RuntimeError, TypeError, AttributeError) as e:
            raise ConfigError(
                f"model.lpips_vgg_path: {weights_path} is not a torchvision VGG16 state_dict ({e})"
            ) from e
        self.features = features.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(_MEAN)[None, :, None, None], persistent=False)
        self.register_buffer("std", torch.tensor(_STD)[None, :, None, None], persistent=False)

    def train(self, mode: bool = True) -> "VGGPerceptualLoss":
        super().train(mode)
        self.features.eval()  # frozen
        return self

    def _taps(self, x: torch.Tensor):
        h = ((x.float() + 1) / 2 - self.mean) / self.std
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _TAPS:
                yield h / (h.norm(dim=1, keepdim=True) + 1e-10)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return sum(((a - b) ** 2).mean() for a, b in zip(self._taps(x), self._taps(y)))
