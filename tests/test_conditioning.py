"""A batch's conditioning reaches every network call: losses, the training loop, the teacher's
solver step, the three samplers, generate's chunks and every edit task."""

import numpy as np
import pytest
import torch
from torch import nn

from cmkit.batch import Batch
from cmkit.config import DataSection, NetworkSpec, RunConfig, TrainingSection
from cmkit.edit_tasks import EditOptions, run_task
from cmkit.editing import TASKS
from cmkit.generate import Model, generate
from cmkit.losses import ConsistencyLoss, TeacherStep, UnbiasedEstimate, l2_distance
from cmkit.noise import FixedScales
from cmkit.process import EDMProcess, FlowProcess
from cmkit.sampling import sample_multistep, sample_ode, sample_onestep
from cmkit.train import TrainState, train
from cmkit.training_times import GridPairs
from cmkit.units import Scaler


class Recorder(nn.Module):
    """F(x, c_noise, **cond) = a·x, recording the labels of every call under its name."""

    def __init__(self, name: str, calls: list):
        super().__init__()
        self.name, self.calls = name, calls
        self.a = nn.Parameter(torch.tensor(0.1))

    def forward(self, x, c_noise, **cond):
        self.calls.append((self.name, cond["labels"].clone()))
        return self.a * x


def labels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(seed))


def batch(n=8, shape=(2,)) -> Batch:
    x0 = torch.randn(n, *shape, generator=torch.Generator().manual_seed(1))
    return Batch(x0, {"labels": labels(n)})


def _assert_all_saw(calls, names, expected):
    assert {name for name, _ in calls} == set(names), calls
    for name, seen in calls:
        assert torch.equal(seen, expected), name


@pytest.mark.parametrize("process", [EDMProcess(), FlowProcess()], ids=["edm", "flow"])
def test_teacher_losses_pass_the_conditioning(process):
    calls, b = [], batch()
    net = process.denoiser(Recorder("teacher", calls))
    process.teacher_loss()(net, None, b, 0, torch.Generator().manual_seed(0))
    _assert_all_saw(calls, ["teacher"], b.cond["labels"])


def test_cd_passes_it_to_student_target_and_the_teachers_solver_step():
    calls, b, proc = [], batch(), EDMProcess()
    teacher = proc.denoiser(Recorder("teacher", calls))
    online = proc.consistency(Recorder("online", calls))
    target = proc.consistency(Recorder("target", calls))
    pairs = GridPairs(proc, FixedScales(18))
    loss = ConsistencyLoss(proc, pairs, TeacherStep(teacher, "heun"), l2_distance)
    loss(online, target, b, 0, torch.Generator().manual_seed(0))
    _assert_all_saw(calls, ["teacher", "online", "target"], b.cond["labels"])
    assert sum(name == "teacher" for name, _ in calls) == 2  # Heun: two evaluations


def test_ct_passes_it_to_online_and_target():
    calls, b, proc = [], batch(), EDMProcess()
    online = proc.consistency(Recorder("online", calls))
    target = proc.consistency(Recorder("target", calls))
    loss = ConsistencyLoss(
        proc, GridPairs(proc, FixedScales(10)), UnbiasedEstimate(proc.perturb), l2_distance
    )
    loss(online, target, b, 0, torch.Generator().manual_seed(0))
    _assert_all_saw(calls, ["online", "target"], b.cond["labels"])


def test_the_training_loop_keeps_each_sample_with_its_conditioning():
    """x0 rows and label rows are drawn together: here the label is the sample's own index."""
    calls, proc = [], EDMProcess()
    x0 = torch.arange(32.0)[:, None].expand(32, 2).contiguous()
    data = Batch(x0, {"labels": torch.arange(32)})
    seen = []

    def loss_fn(online, target, b, step, generator):
        seen.append((b.x0[:, 0].long(), b.cond["labels"]))
        return proc.teacher_loss()(online, target, b, step, generator)

    online = proc.denoiser(Recorder("teacher", calls))
    state = TrainState(
        online,
        torch.optim.SGD(online.parameters(), lr=1e-3),
        torch.Generator().manual_seed(0),
        Recorder("ema", []),
    )
    train(state, loss_fn, data, 3, 8, 0.9, progress=False)
    assert len(seen) == 3 and all(torch.equal(x, y) for x, y in seen)


@pytest.mark.parametrize("process", [EDMProcess(), FlowProcess()], ids=["edm", "flow"])
def test_the_three_samplers_pass_it_to_every_evaluation(process):
    calls, cond = [], {"labels": labels(6)}
    f = process.consistency(Recorder("f", calls))
    z = torch.randn(6, 2)
    sample_onestep(f, process, z, cond)
    times = process.default_times(3)
    sample_multistep(f, process, z, times, [torch.randn(6, 2) for _ in times], cond)
    sample_ode(f, process, z, 4, "heun", cond)
    assert len(calls) == 1 + 3 + (2 * 3 + 1)
    _assert_all_saw(calls, ["f"], cond["labels"])


def _model(kind: str, calls: list) -> Model:
    proc = EDMProcess()
    data = DataSection("test", 0.0, (3, 8, 8), Scaler((0.5,), (0.5,)))
    config = RunConfig(kind, proc, NetworkSpec("test"), data, TrainingSection("test"))
    wrap = proc.consistency if kind == "consistency" else proc.denoiser
    return Model(config, wrap(Recorder("f", calls)))


def test_generate_slices_the_conditioning_with_its_chunks():
    calls, cond = [], {"labels": labels(10)}
    generate(_model("consistency", calls), 10, steps=2, chunk=4, cond=cond)
    assert [len(seen) for _, seen in calls] == [4, 4, 4, 4, 2, 2]  # 2 evaluations a chunk
    assert torch.equal(torch.cat([calls[i][1] for i in (0, 2, 4)]), cond["labels"])


def _inputs(task: str) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    if task == "interpolate":  # two standard-normal noise arrays
        return [rng.standard_normal((4, 3, 8, 8), dtype=np.float32) for _ in range(2)]
    shape = (4, 3, 4, 4) if task == "superres" else (4, 3, 8, 8)
    return [rng.uniform(-1, 1, shape).astype(np.float32)]


@pytest.mark.parametrize("task", TASKS)
def test_every_edit_task_passes_it_to_every_evaluation(task):
    calls = []
    n = 4 * 2 if task == "interpolate" else 4  # interpolate: 2 frames per noise pair
    inputs = _inputs(task)
    cond = {"labels": labels(n)}
    opts = EditOptions(
        mask="center" if task == "inpaint" else None,
        sigma=0.3 if task == "denoise" else None,
        frames=2,
    )
    run_task(_model("consistency", calls), task, inputs, opts, cond)
    assert calls
    _assert_all_saw(calls, ["f"], cond["labels"])
