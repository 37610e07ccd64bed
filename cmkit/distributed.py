"""Multi-process training on torch.distributed: a process's world, the collectives the loop
agrees through, and `--nproc`, which starts the processes of one machine itself.

A process belongs to a world of WORLD_SIZE processes when torchrun (or `--nproc`) set RANK,
WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT; without them it is alone and nothing here runs
a collective, so a single process computes exactly what it computed before. The processes
share each step: every one draws the global batch and its noise from the shared generator
and trains on its rows (batch.Shard); DistributedDataParallel averages the network's
gradients and `average_gradients` those of the loss's own weights, so every process applies
the same update to identical weights, EMA and target included.
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from cmkit.batch import Shard
from cmkit.errors import OptionError, UserError

LAUNCHER_FD = "CMKIT_LAUNCHER_FD"  # a pipe from `launch`: end of file means it died
GRACE_SECONDS = 30.0  # how long the others may take to stop after one process failed
BACKENDS = {"cpu": "gloo", "cuda": "nccl"}


@dataclass(frozen=True)
class World:
    """The `size` processes training one run; rank 0 writes the checkpoints and reports."""

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")  # where this process trains and reduces

    @property
    def main(self) -> bool:
        return self.rank == 0

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size % self.size:
            raise OptionError(
                "batch_size",
                f"{batch_size} does not divide among {self.size} processes; the global batch "
                "is split evenly",
            )

    def shard(self, batch_size: int) -> Shard:
        """This process's rows of a global batch of `batch_size` samples."""
        per = batch_size // self.size
        return Shard(slice(self.rank * per, (self.rank + 1) * per), batch_size)

    def sum(self, values: Sequence[float]) -> list[float]:
        """Each value summed over the processes, in float64 (alone: the values themselves)."""
        if self.size == 1:
            return list(values)
        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return total.tolist()

    def any(self, flag: bool) -> bool:
        """True on every process when it is True on one."""
        return self.sum([float(flag)])[0] > 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def average_gradients(self, parameters: Iterable[nn.Parameter]) -> None:
        """Gradients averaged over the processes, as DDP does for the network (the loss's own
        weights, such as sCM's w_φ, are not part of the network DDP wraps)."""
        grads = [p.grad for p in parameters if p.grad is not None]
        if self.size == 1 or not grads:
            return
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        flat /= self.size
        for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(part.view_as(g))

    def wrap(self, net: nn.Module) -> nn.Module:
        """The network as DistributedDataParallel, whose backward averages its gradients."""
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(net, device_ids=ids)


def _environment() -> tuple[int, int, int] | None:
    """(RANK, WORLD_SIZE, LOCAL_RANK) set by torchrun or `launch`, or None when alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return None
    try:
        return tuple(int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except (KeyError, ValueError):
        raise UserError(
            "WORLD_SIZE is set but RANK or LOCAL_RANK is missing or not a number; start "
            "processes with torchrun or --nproc"
        ) from None


def is_main_process() -> bool:
    """Rank 0 or alone: the process that reports (every process meets the same outcomes)."""
    return os.environ.get("RANK", "0") == "0"


def _local_device(device: str, size: int, local_rank: int) -> torch.device:
    """cuda: the GPU of this process's LOCAL_RANK; cpu stays cpu; anything else is refused."""
    dev = torch.device(device)
    if dev.type not in BACKENDS:
        raise OptionError("device", f"{device}: several processes train on cpu or cuda")
    if dev.type == "cpu":
        return dev
    if dev.index is not None and dev.index != local_rank:
        raise OptionError(
            "device",
            f"{device}: each of the {size} processes trains on the GPU of its local rank; "
            "pass --device cuda",
        )
    return torch.device("cuda", local_rank)


@contextmanager
def joined(device: str) -> Iterator[World]:
    """This process's world, with its process group (gloo on cpu, nccl on cuda) for the
    duration; alone without torchrun's variables."""
    env = _environment()
    if env is None:
        yield World(device=torch.device(device))
        return
    rank, size, local_rank = env
    dev = _local_device(device, size, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    _end_with_launcher()
    dist.init_process_group(BACKENDS[dev.type], rank=rank, world_size=size)
    try:
        yield World(rank, size, dev)
    finally:
        dist.destroy_process_group()


def _end_with_launcher() -> None:
    """Under `launch`, die with it: a launcher killed with SIGKILL leaves no process training
    (and writing checkpoints) behind. Its pipe reads end-of-file when it dies."""
    fd = os.environ.get(LAUNCHER_FD)
    if fd is None:
        return

    def watch() -> None:
        os.read(int(fd), 1)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="cmkit-launcher", daemon=True).start()


def launches(nproc: int | None) -> bool:
    """Whether this process is to start `nproc` processes itself (--nproc outside torchrun);
    under torchrun --nproc may only repeat its number of processes on this machine."""
    if nproc is None:
        return False
    if nproc < 1:
        raise OptionError("nproc", f"must be >= 1, got {nproc}")
    local = os.environ.get("LOCAL_WORLD_SIZE")
    if local is None:
        return nproc > 1
    if int(local) != nproc:
        raise OptionError(
            "nproc", f"is {nproc} under a launcher that started {local} processes; leave it out"
        )
    return False


def launch(nproc: int, argv: Sequence[str]) -> int:
    """`python -m cmkit ARGV` as `nproc` processes of one world on this machine, set up as
    torchrun --nproc_per_node would, keeping cmkit's exit codes (torchrun turns them into 1).

    The processes run in sessions of their own and SIGINT/SIGTERM reach them through here,
    so a terminal's Ctrl-C arrives once; each has 1/nproc of the cores unless OMP_NUM_THREADS
    says otherwise. Returns the first non-zero exit code in rank order (128 + n for one
    ended by signal n), else 0."""
    if os.name != "posix":
        raise OptionError("nproc", "starts processes on POSIX systems; use torchrun elsewhere")
    watched, held = os.pipe()  # `held` closes when this process ends, however it ends
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        LAUNCHER_FD: str(watched),
    }
    env.setdefault("OMP_NUM_THREADS", str(max(1, _cores() // nproc)))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "cmkit", *argv],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            pass_fds=(watched,),
            start_new_session=True,
        )
        for rank in range(nproc)
    ]
    os.close(watched)
    try:
        with _passing_signals(procs):
            codes = _wait(procs)
    finally:
        os.close(held)
    return next((code for code in codes if code != 0), 0)


def _cores() -> int:
    """The cores this process may run on (all of the machine's where that is unknown)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _passing_signals(procs: list[subprocess.Popen]) -> Iterator[None]:
    """SIGINT and SIGTERM passed on to the processes still running (a signal ignored here,
    as under nohup, stays ignored: they inherit that)."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    handled = [s for s, h in previous.items() if h not in (signal.SIG_IGN, None)]

    def pass_on(signum, frame) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    for s in handled:
        signal.signal(s, pass_on)
    try:
        yield
    finally:
        for s in handled:
            signal.signal(s, previous[s])


def _wait(procs: list[subprocess.Popen]) -> list[int]:
    """Every exit code (128 + n for signal n); once one process failed, the others get
    GRACE_SECONDS to reach the same decision before they are killed (one waiting in a
    collective for a process that died would wait for torch's 30-minute timeout)."""
    deadline = None
    while any(p.poll() is None for p in procs):
        if deadline is None and any(p.returncode not in (None, 0) for p in procs):
            deadline = time.monotonic() + GRACE_SECONDS
        if deadline is not None and time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.05)
    return [p.returncode if p.returncode >= 0 else 128 - p.returncode for p in procs]
