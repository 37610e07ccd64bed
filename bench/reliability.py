"""Reliability costs and limits: how long a journaled checkpoint takes, and how far a CPU run
drifts when only the thread count changes. Prints a Markdown section for BENCHMARKS.md.

    python bench/reliability.py [--repeats 5]
"""

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cmkit.batch import Batch
from cmkit.config import DataSection, RunConfig, TrainingSection
from cmkit.data import load_data
from cmkit.networks.zoo import build_network, default_network
from cmkit.process import EDMProcess
from cmkit.runs import save_checkpoint
from cmkit.train import TrainState, train
from cmkit.units import Scaler


def make_state(spec: dict, seed: int = 0) -> TrainState:
    """A consistency-style state (online, target, EMA, Adam) for the network `spec`."""
    torch.manual_seed(seed)
    net = build_network(spec)
    proc = EDMProcess()
    online, target = proc.consistency(net), proc.consistency(copy.deepcopy(net))
    optimizer = torch.optim.Adam(online.parameters(), lr=1e-3)
    return TrainState(online, optimizer, torch.Generator().manual_seed(seed), net, target)


def checkpoint_seconds(spec, repeats: int) -> tuple[float, int, int]:
    """Median wall time of save_checkpoint, the bytes it writes and the parameter count."""
    state = make_state(spec)
    state.online.net.zero_grad()
    for p in state.online.parameters():  # Adam moments exist only after a step
        p.grad = torch.zeros_like(p)
    state.optimizer.step()
    data = DataSection("bench", 0.0, (1,), Scaler((0.0,), (1.0,)))
    config = RunConfig("consistency", EDMProcess(), spec, data, TrainingSection("bench"))
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            start = time.perf_counter()
            save_checkpoint(Path(tmp), config, state)
            times.append(time.perf_counter() - start)
        size = sum(p.stat().st_size for p in Path(tmp).iterdir())
    params = sum(p.numel() for p in state.online.parameters())
    return statistics.median(times), size, params


def teacher_weights(threads: int, steps: int = 50) -> dict[str, torch.Tensor]:
    """Online weights after a short EDM teacher run on moons with `threads` CPU threads."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = build_network(default_network((2,)))
    online = EDMProcess().denoiser(net)
    state = TrainState(
        online,
        torch.optim.Adam(online.parameters(), lr=1e-3),
        torch.Generator().manual_seed(0),
        copy.deepcopy(net),
    )
    data = Batch(torch.from_numpy(load_data("moons")))
    train(state, EDMProcess().teacher_loss(), data, steps, 512, 0.99, progress=False)
    return {k: v.clone() for k, v in net.state_dict().items()}


def max_difference(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print("| network | parameters | checkpoint size | time per checkpoint |")
    print("|---|---|---|---|")
    for name, shape in (("MLP, 2-D toys", (2,)), ("UNet, digits 8x8", (1, 8, 8))):
        seconds, size, params = checkpoint_seconds(default_network(shape), args.repeats)
        print(f"| {name} | {params:,} | {size / 2**20:.1f} MiB | {seconds * 1000:.0f} ms |")
    one, two, one_again = teacher_weights(1), teacher_weights(2), teacher_weights(1)
    print()
    print(f"50 teacher steps, 1 thread twice: max |Δw| = {max_difference(one, one_again):.3g}")
    print(f"50 teacher steps, 1 against 2 threads: max |Δw| = {max_difference(one, two):.3g}")


if __name__ == "__main__":
    main()
