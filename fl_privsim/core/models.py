"""The model zoo: every model is shaped by the dataset's channels, image size and classes.

- ``mlp``: Flatten → Linear(d, width) → ReLU → Linear(width, width) → ReLU → Linear(width, K).
  Its first layer is a fully-connected layer with bias, the setting of the analytic attack.
- ``lenet``: the sigmoid LeNet of DLG (Zhu et al., NeurIPS 2019): three 5×5 convolutions
  (stride 2, 2, 1; 12 channels; padding 2) with sigmoid activations, then one linear layer.
  The linear layer's input size follows from the image size (768 for 32×32).
- ``convnet``: a small conv net (conv-ReLU ×3 with max-pooling, then two linear layers).
- ``convnet_bn``: the ConvNet of Inverting Gradients / breaching (Geiping et al., NeurIPS 2020;
  ``ConvNet(width=64)`` of their reference code), the model their CIFAR-10 experiments attack:
  eight 3×3 conv-BatchNorm-ReLU blocks (padding 1) with 64, 128, 128, 256, 256, 256 channels,
  a 3×3 max-pool, two more 256-channel blocks, another 3×3 max-pool, then one linear layer to
  the K logits (2304 inputs for 32×32; for images under 9 pixels a side the pools that
  would shrink them below 1×1 are left out).
- ``cnn6``: the CNN6 of R-GAP (Zhu & Blaschko, ICLR 2021): six bias-free convolutions
  (3→12 k4 s2 p2, 12→36 k3 s2, 36→36 k3, 36→36 k3, 36→64 k3 s2, 64→128 k3; padding 1
  unless stated) each followed by LeakyReLU(0.2), then a bias-free Linear to the K logits
  (3200 inputs for 32×32; the paper's single logistic output becomes K classes here).
- ``resnet18``: torchvision's ResNet-18, random init, stem adapted to small images
  (3×3 stride-1 first convolution, no max-pool) as is usual for CIFAR-sized inputs.
- ``linear``: Flatten → Linear(d, K), softmax regression: the dense layer of Eloul et al.
  (arXiv:2204.12495) that sees the raw input, for analytic batch de-mixing.

:func:`init_weights` re-initialises a model by a named scheme (``default`` keeps PyTorch's
own initialisation; ``uniform`` is DLG's U(−0.5, 0.5)).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from fl_privsim.core import plugins
from fl_privsim.core.errors import ConfigError, did_you_mean

InputShape = tuple[int, int, int]


def _flat_features(body: nn.Module, input_shape: InputShape) -> int:
    with torch.no_grad():
        out = body(torch.zeros(1, *input_shape))
    return int(out.flatten(1).shape[1])


@plugins.MODELS.register("mlp")
def mlp(input_shape: InputShape, num_classes: int, *, width: int = 256) -> nn.Module:
    """Two-hidden-layer ReLU MLP whose first layer is linear with bias."""
    d = input_shape[0] * input_shape[1] * input_shape[2]
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(d, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, num_classes),
    )


@plugins.MODELS.register("lenet")
class LeNet(nn.Module):
    """Sigmoid LeNet used by DLG/iDLG (Zhu et al. 2019; Zhao et al. 2020)."""

    def __init__(self, input_shape: InputShape, num_classes: int) -> None:
        super().__init__()
        c = input_shape[0]
        self.body = nn.Sequential(
            nn.Conv2d(c, 12, kernel_size=5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=1),
            nn.Sigmoid(),
        )
        self.fc = nn.Linear(_flat_features(self.body, input_shape), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(self.body(x).flatten(1))
        return out


@plugins.MODELS.register("convnet")
class ConvNet(nn.Module):
    """A small ReLU conv net: 3 conv blocks (32/64/64 channels) and a 2-layer head."""

    def __init__(self, input_shape: InputShape, num_classes: int) -> None:
        super().__init__()
        c, h, _ = input_shape
        pool = 2 if h >= 16 else 1
        self.body = nn.Sequential(
            nn.Conv2d(c, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(pool),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(pool),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Sequential(
            nn.Linear(_flat_features(self.body, input_shape), 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.body(x).flatten(1))
        return out


@plugins.MODELS.register("convnet_bn")
class ConvNetBN(nn.Module):
    """The BatchNorm ConvNet of Inverting Gradients and breaching (Geiping et al. 2020).

    ``width`` 64 is the reference's ``ConvNet(width=64)``: blocks ``convI``-``bnI``-``reluI``
    with ``(1, 2, 2, 4, 4, 4)·width`` channels, ``pool0`` (max-pool 3), two ``4·width`` blocks,
    ``pool1`` (max-pool 3), ``flatten`` and ``linear``. Layer names follow the reference.
    """

    #: Channel multiples of ``width`` of the eight conv blocks; a max-pool follows these.
    BLOCKS = (1, 2, 2, 4, 4, 4, 4, 4)
    POOL_AFTER = (5, 7)

    def __init__(self, input_shape: InputShape, num_classes: int, *, width: int = 64) -> None:
        super().__init__()
        layers: dict[str, nn.Module] = {}
        c, size = input_shape[0], min(input_shape[1], input_shape[2])
        for i, mult in enumerate(self.BLOCKS):
            layers[f"conv{i}"] = nn.Conv2d(c, mult * width, kernel_size=3, padding=1)
            layers[f"bn{i}"] = nn.BatchNorm2d(mult * width)
            layers[f"relu{i}"] = nn.ReLU()
            c = mult * width
            if i in self.POOL_AFTER:
                kernel = 3 if size >= 3 else 1  # images under 9 pixels: no pooling past 1×1
                layers[f"pool{self.POOL_AFTER.index(i)}"] = nn.MaxPool2d(kernel)
                size //= kernel
        layers["flatten"] = nn.Flatten()
        body = nn.Sequential(*layers.values())
        features = _flat_features(body.eval(), input_shape)  # eval: leave BN buffers alone
        body.train()
        layers["linear"] = nn.Linear(features, num_classes)
        self.model = nn.Sequential(OrderedDict(layers.items()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(x)
        return out


@plugins.MODELS.register("cnn6")
class CNN6(nn.Module):
    """R-GAP's CNN6 (Zhu & Blaschko, ICLR 2021): bias-free convs with LeakyReLU(0.2)."""

    #: (out_channels, kernel, stride, padding) of the six convolutions.
    LAYERS = (
        (12, 4, 2, 2),
        (36, 3, 2, 1),
        (36, 3, 1, 1),
        (36, 3, 1, 1),
        (64, 3, 2, 1),
        (128, 3, 1, 1),
    )

    def __init__(self, input_shape: InputShape, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = input_shape[0]
        for out, k, s, p in self.LAYERS:
            layers += [
                nn.Conv2d(c, out, kernel_size=k, stride=s, padding=p, bias=False),
                nn.LeakyReLU(0.2),
            ]
            c = out
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(_flat_features(self.body, input_shape), num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(self.body(x).flatten(1))
        return out


@plugins.MODELS.register("resnet18")
def resnet18(input_shape: InputShape, num_classes: int) -> nn.Module:
    """torchvision ResNet-18 (random init, no downloaded weights) for small images."""
    from torchvision.models import resnet18 as tv_resnet18

    model: nn.Module = tv_resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(input_shape[0], 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


@plugins.MODELS.register("resnet18_gn")
def resnet18_gn(input_shape: InputShape, num_classes: int) -> nn.Module:
    """:func:`resnet18` with every BatchNorm replaced by GroupNorm through Opacus'
    ``ModuleValidator.fix``: per-sample gradients exist, so DP-SGD (``dp_sgd``) can train it.
    Server and clients build the same architecture, so the global model stays consistent."""
    from opacus.validators import ModuleValidator

    model: nn.Module = ModuleValidator.fix(resnet18(input_shape, num_classes))
    return model


@plugins.MODELS.register("linear")
def linear(input_shape: InputShape, num_classes: int) -> nn.Module:
    """Softmax regression: one dense layer with bias on the flattened input."""
    d = input_shape[0] * input_shape[1] * input_shape[2]
    return nn.Sequential(nn.Flatten(), nn.Linear(d, num_classes))


#: The architectures (``model.name`` without a variant suffix): the registry
#: :data:`fl_privsim.core.plugins.MODELS`, which each builder above joins where it is defined.
MODELS = plugins.MODELS


#: Weight initialisation schemes accepted by :func:`init_weights` (``model.init``).
INITS = ("default", "uniform", "normal", "kaiming", "xavier")


def init_weights(
    model: nn.Module, scheme: str, generator: torch.Generator | None = None
) -> nn.Module:
    """Re-initialise the weights of every conv and linear layer of ``model`` in place.

    ``default`` leaves PyTorch's initialisation. ``uniform``: weights and biases
    U(−0.5, 0.5), as in DLG's experiments (Zhu et al., NeurIPS 2019), which makes the
    sigmoid LeNet's gradients depend strongly on the input. ``normal``: N(0, 1) weights,
    zero biases. ``kaiming``/``xavier``: He / Glorot normal weights, zero biases (the
    initialisations compared by Zhang et al., I2F, NeurIPS 2023). Normalisation layers are
    left alone. Draws come from ``generator`` (CPU) when given.
    """
    if scheme not in INITS:
        raise ConfigError(f"model.init: unknown scheme {scheme!r}; allowed: {', '.join(INITS)}")
    if scheme == "default":
        return model
    with torch.no_grad():
        for mod in model.modules():
            if not isinstance(mod, (nn.Conv2d, nn.Linear)):
                continue
            w = torch.empty(mod.weight.shape, dtype=mod.weight.dtype)
            if scheme == "uniform":
                w.uniform_(-0.5, 0.5, generator=generator)
            elif scheme == "normal":
                w.normal_(0.0, 1.0, generator=generator)
            elif scheme == "kaiming":
                nn.init.kaiming_normal_(w, nonlinearity="relu", generator=generator)
            else:
                nn.init.xavier_normal_(w, generator=generator)
            mod.weight.copy_(w)
            if mod.bias is not None:
                b = torch.zeros(mod.bias.shape, dtype=mod.bias.dtype)
                if scheme == "uniform":
                    b.uniform_(-0.5, 0.5, generator=generator)
                mod.bias.copy_(b)
    return model


def build_model(
    name: str,
    input_shape: InputShape,
    num_classes: int,
    *,
    init: str = "default",
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Build model ``name`` for inputs of ``input_shape`` (C, H, W) and ``num_classes``.

    ``init`` names a scheme of :func:`init_weights`; ``generator`` supplies its draws.
    """
    base, variant = plugins.split_model_name(name)  # variant: e.g. vib, clients/defenses/vib.py
    if base not in MODELS:
        suffixes = " or ".join(repr(f"_{v}") for v in plugins.MODEL_VARIANTS.names())
        raise ConfigError(
            f"model.name: unknown model {name!r}{did_you_mean(name, plugins.model_names())}; "
            f"allowed: {', '.join(MODELS)} (or any of them + {suffixes}, a model variant)"
        )
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ConfigError(
            f"model: input shape must be (C, H, W) with positive sizes, got {input_shape}"
        )
    if num_classes < 2:
        raise ConfigError(f"model: need at least 2 classes, got {num_classes}")
    if variant is not None:  # e.g. the VIB head the vib defense registers (build_vib_model)
        model = plugins.MODEL_VARIANTS.get(variant)(base, input_shape, num_classes)
    else:
        shape = (int(input_shape[0]), int(input_shape[1]), int(input_shape[2]))
        model = MODELS[name](shape, int(num_classes))
    return init_weights(model, init, generator)
