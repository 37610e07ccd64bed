"""Feature extractors for image metrics: images in [0, 1], shape (N, C, H, W) → (N, F).

`digitsnet` is a small classifier trained on the built-in digits' training split, `mnistnet`
one trained on MNIST's 60000 training images; their weights ship in the package and
`scripts/train_digitsnet.py`, `scripts/train_mnistnet.py` reproduce them. `pixels` uses
the raw pixels. `inception` is the standard FID network, where the user has its weights;
a path loads the user's own TorchScript (or torch.export .pt2) module. Metrics are named
after the features: only Inception features make an "FID".
"""

import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from cmkit.errors import OptionError, UserError

DIGITSNET_WEIGHTS = Path(__file__).parent / "assets" / "digitsnet.safetensors"
MNISTNET_WEIGHTS = Path(__file__).parent / "assets" / "mnistnet.safetensors"
MNISTNET_WIDTH = 24  # narrower than digitsnet's 32, so the shipped weights stay under 1 MB
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's cache name


class SmallClassifier(nn.Module):
    """Two strided convolutions and a linear feature layer; features are its pre-logit output."""

    def __init__(self, channels: int = 1, size: int = 8, classes: int = 10, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Flatten(),
            nn.Linear(2 * width * ((size + 3) // 4) ** 2, 2 * width),
        )
        self.head = nn.Sequential(nn.SiLU(), nn.Linear(2 * width, classes))
        self.num_features = 2 * width
        # features are divided by their RMS on the training data, so kernels such as KID's
        # cubic (x·y/d + 1)³ see values of order 1, as they do on Inception features
        self.register_buffer("feature_rms", torch.ones(()))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(2 * x - 1) / self.feature_rms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits, for training."""
        return self.head(self.body(2 * x - 1))


class _Features(nn.Module):
    """Wrap a module as an extractor with the `num_features` torchmetrics looks for."""

    def __init__(self, fn, num_features: int, name: str) -> None:
        super().__init__()
        self.fn, self.num_features, self.name = fn, num_features, name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x).flatten(1)


def named_extractor(net: SmallClassifier, name: str) -> nn.Module:
    """A trained classifier's features as an extractor whose metrics carry `name`."""
    return _Features(net.features, net.num_features, name)


def train_classifier(
    images: np.ndarray, labels: np.ndarray, epochs: int = 40, seed: int = 0, width: int = 32
) -> SmallClassifier:
    """Train a SmallClassifier on images (N, C, H, W) in [0, 1]; deterministic on one CPU
    thread."""
    x = torch.as_tensor(images, dtype=torch.float32)
    y = torch.as_tensor(labels, dtype=torch.long)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a fixed reduction order, so the weights are reproducible
    try:
        torch.manual_seed(seed)
        net = SmallClassifier(x.shape[1], x.shape[2], int(y.max()) + 1, width)
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=gen).split(64):
                # small random shifts: features that do not hinge on exact pixel positions
                shift = torch.randint(-1, 2, (2,), generator=gen).tolist()
                batch = torch.roll(x[idx], shifts=shift, dims=(2, 3))
                loss = nn.functional.cross_entropy(net(batch), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():  # in chunks: one pass over 60000 MNIST images would need GBs
            body = torch.cat([net.body(2 * chunk - 1) for chunk in x.split(2000)])
            net.feature_rms.copy_(body.pow(2).mean().sqrt())
    finally:
        torch.set_num_threads(threads)
    return net.eval()


def accuracy(net: SmallClassifier, images: np.ndarray, labels: np.ndarray) -> float:
    x = torch.as_tensor(images, dtype=torch.float32)
    with torch.no_grad():
        pred = torch.cat([net(chunk).argmax(1) for chunk in x.split(2000)])
    return float((pred == torch.as_tensor(labels, dtype=torch.long)).double().mean())


def load_digitsnet() -> SmallClassifier:
    net = SmallClassifier()
    net.load_state_dict(load_file(str(DIGITSNET_WEIGHTS)))
    return net.eval()


def load_mnistnet() -> SmallClassifier:
    net = SmallClassifier(size=28, width=MNISTNET_WIDTH)
    net.load_state_dict(load_file(str(MNISTNET_WEIGHTS)))
    return net.eval()


def _inception() -> nn.Module:
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ModuleNotFoundError as err:
        raise OptionError("features", f"inception needs torch-fidelity installed ({err})") from None
    path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if not path.is_file():
        raise UserError(
            f"--features inception: the standard FID Inception weights are not at {path}; "
            "put them there (cmkit never downloads) or pass a TorchScript extractor path"
        )
    try:
        net = NoTrainInceptionV3("inception-v3-compat", ["2048"], str(path))
    except ModuleNotFoundError as err:
        raise OptionError("features", f"inception needs torch-fidelity installed ({err})") from None

    def to_inception(x: torch.Tensor) -> torch.Tensor:
        rgb = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        return net((rgb.clamp(0, 1) * 255).to(torch.uint8))

    return _Features(to_inception, 2048, "inception")


def _torchscript(path: Path, shape: tuple[int, ...]) -> nn.Module:
    try:
        if path.suffix == ".pt2":
            module = torch.export.load(str(path)).module()
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript still loads
                module = torch.jit.load(str(path), map_location="cpu").eval()
        with torch.no_grad():
            probe = module(torch.full((2, *shape), 0.5))
    except Exception as err:  # a file that is not TorchScript, or that rejects our images
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"--features {path}: expected a TorchScript module mapping (N, "
            f"{', '.join(map(str, shape))}) images in [0, 1] to (N, F) features ({msg})"
        ) from None
    return _Features(module, probe.flatten(1).shape[1], path.stem)


SHIPPED = {  # name: (the image shape it reads, its loader)
    "digitsnet": ((1, 8, 8), load_digitsnet),
    "mnistnet": ((1, 28, 28), load_mnistnet),
}


def default_features(shape: tuple[int, ...]) -> str:
    """The shipped network trained on images of this shape, else raw pixels."""
    return next((name for name, (s, _) in SHIPPED.items() if s == tuple(shape)), "pixels")


def make_extractor(name: str | None, shape: tuple[int, ...]) -> nn.Module:
    """The extractor for images of `shape` (C, H, W): named, a TorchScript path, or the default
    (digitsnet for 1×8×8 images, mnistnet for 1×28×28, raw pixels otherwise). Its `.name`
    labels the metrics."""
    name = name or default_features(shape)
    if name in SHIPPED:
        reads, load = SHIPPED[name]
        if tuple(shape) != reads:
            raise UserError(
                f"--features {name} reads {'x'.join(map(str, reads))} images, "
                f"got {'x'.join(map(str, shape))}"
            )
        return named_extractor(load(), name)
    if name == "pixels":
        return _Features(lambda x: x, int(np.prod(shape)), "pixels")
    if name == "inception":
        return _inception()
    path = Path(name)
    if not path.is_file():
        raise UserError(
            f"--features {name!r}: expected digitsnet, mnistnet, pixels, inception or a "
            "TorchScript file"
        )
    return _torchscript(path, tuple(shape))
