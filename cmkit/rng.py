"""The global RNG of each device type, which draws dropout masks there.

The consistency loss replays it so that the online and target passes share their masks, and
checkpoints save it so that a resumed run on that device draws the masks it would have drawn.
Batches and noise come from a CPU generator instead (see train.TrainState.generator).
"""

import torch

from cmkit.errors import UserError


def device_rng_state(device: torch.device) -> torch.Tensor:
    """The state of the RNG that random ops on `device` draw from."""
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    if device.type == "mps":
        return torch.mps.get_rng_state()
    if device.type == "cpu":
        return torch.get_rng_state()
    raise UserError(f"no RNG for device {device}; expected cpu, cuda or mps")


def set_device_rng_state(state: torch.Tensor, device: torch.device) -> None:
    """Put back a state from `device_rng_state(device)`."""
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    elif device.type == "mps":
        torch.mps.set_rng_state(state)
    elif device.type == "cpu":
        torch.set_rng_state(state)
    else:
        raise UserError(f"no RNG for device {device}; expected cpu, cuda or mps")
