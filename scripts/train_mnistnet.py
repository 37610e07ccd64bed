"""Reproduce cmkit/assets/mnistnet.safetensors, the feature network of the MNIST metrics.

Trains on MNIST's 60000 training images (2 epochs, width 24, one CPU thread: about 2
minutes) and prints accuracy on its 10000 test images. Deterministic: the same torch version
gives the same weights. The data is the user's: an .npz with x_train, y_train, x_test,
y_test as uint8 (N, 28, 28) images and labels (cmkit never downloads).

    python scripts/train_mnistnet.py --data mnist.npz [--check]
"""

import argparse
from pathlib import Path

import numpy as np
from safetensors.torch import load_file, save_file

from cmkit.features import MNISTNET_WEIGHTS, MNISTNET_WIDTH, accuracy, train_classifier

EPOCHS = 2


def mnist_arrays(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images, test labels), images (N, 1, 28, 28) in [0, 1]."""
    with np.load(path, allow_pickle=False) as f:
        x, y, xt, yt = (f[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    unit = lambda a: (a[:, None] / 255.0).astype(np.float32)  # noqa: E731
    return unit(x), y.astype(np.int64), unit(xt), yt.astype(np.int64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path, help="mnist.npz")
    parser.add_argument("--check", action="store_true", help="compare with the shipped file")
    args = parser.parse_args()
    x, y, xt, yt = mnist_arrays(args.data)
    net = train_classifier(x, y, epochs=EPOCHS, width=MNISTNET_WIDTH)
    print(f"test accuracy {accuracy(net, xt, yt):.4f} on {len(xt)} images")
    weights = {k: v.contiguous() for k, v in net.state_dict().items()}
    if args.check:
        shipped = load_file(str(MNISTNET_WEIGHTS))
        same = all(bool((shipped[k] == v).all()) for k, v in weights.items())
        print("identical to the shipped weights" if same else "DIFFERS from the shipped weights")
        raise SystemExit(0 if same else 1)
    save_file(weights, str(MNISTNET_WEIGHTS))
    print(f"wrote {MNISTNET_WEIGHTS}")


if __name__ == "__main__":
    main()
