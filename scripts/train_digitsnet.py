"""Reproduce cmkit/assets/digitsnet.safetensors, the feature network of the digits metrics.

Trains on the digits' training split (the fixed split every run uses: 10% held out, seed 0)
and prints held-out accuracy. Deterministic: the same torch version gives the same weights.

    python scripts/train_digitsnet.py [--check]
"""

import argparse

import numpy as np
from safetensors.torch import load_file, save_file
from sklearn.datasets import load_digits

from cmkit.data import split_holdout
from cmkit.features import DIGITSNET_WEIGHTS, accuracy, train_classifier


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, held-out images, held-out labels), images in [0, 1]."""
    d = load_digits()
    images = (d.images[:, None] / 16).astype(np.float32)
    index = np.arange(len(images))
    train_idx, held_idx = split_holdout(index, 0.1)
    return images[train_idx], d.target[train_idx], images[held_idx], d.target[held_idx]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the shipped file")
    args = parser.parse_args()
    x, y, xh, yh = digits_split()
    net = train_classifier(x, y)
    print(f"held-out accuracy {accuracy(net, xh, yh):.4f} on {len(xh)} digits")
    weights = {k: v.contiguous() for k, v in net.state_dict().items()}
    if args.check:
        shipped = load_file(str(DIGITSNET_WEIGHTS))
        same = all(bool((shipped[k] == v).all()) for k, v in weights.items())
        print("identical to the shipped weights" if same else "DIFFERS from the shipped weights")
        raise SystemExit(0 if same else 1)
    save_file(weights, str(DIGITSNET_WEIGHTS))
    print(f"wrote {DIGITSNET_WEIGHTS}")


if __name__ == "__main__":
    main()
