"""The training loop: the NaN/inf guard, skipped batches, Ctrl-C and SIGTERM, checkpoints by
wall time and reproducible curves."""

import copy
import signal

import pytest
import torch

from cmkit.batch import Batch
from cmkit.losses import EDMLoss
from cmkit.networks.mlp import MLP
from cmkit.process import EDMProcess
from cmkit.train import TrainingDiverged, TrainingInterrupted, TrainState, train

DATA = Batch(0.5 * torch.randn(256, 2, generator=torch.Generator().manual_seed(5)))
edm_loss = EDMLoss(EDMProcess())


def make_state(seed=0, optimizer=torch.optim.Adam, lr=1e-3) -> TrainState:
    torch.manual_seed(seed)
    net = MLP(2, hidden=16, depth=1)
    online = EDMProcess().denoiser(net)
    ema = copy.deepcopy(net).requires_grad_(False)
    return TrainState(
        online, optimizer(online.parameters(), lr=lr), torch.Generator().manual_seed(seed), ema
    )


def teacher_loss(bad_steps=(), kind="loss"):
    """EDM loss, made NaN at the given 0-based steps: in the loss itself, or only in the
    gradient (√(0·loss) is 0 but its derivative is ∞·0 = NaN)."""

    def loss_fn(f, _target, x0, step, generator):
        loss = edm_loss(f, None, x0, step, generator)
        if step in bad_steps and kind == "loss":
            return loss * float("nan")
        if step in bad_steps and kind == "gradient":
            return loss * 0 + torch.sqrt(loss * 0)
        return loss

    return loss_fn


def snapshots():
    """A checkpoint callback recording (step, online weights, EMA weights)."""
    saved = []

    def checkpoint(state):
        saved.append((state.step, _weights(state.online.net), _weights(state.ema)))

    return saved, checkpoint


def _weights(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def run(state, loss_fn, steps=8, **kwargs):
    return train(state, loss_fn, DATA, steps, 16, 0.9, progress=False, **kwargs)


@pytest.mark.parametrize("kind,what", [("loss", "the loss is nan"), ("gradient", "gradient norm")])
def test_nonfinite_stops_naming_the_step_and_keeps_the_last_good_state(kind, what):
    saved, checkpoint = snapshots()
    state = make_state()
    with pytest.raises(TrainingDiverged) as info:
        run(state, teacher_loss({3}, kind), checkpoint=checkpoint, checkpoint_every=2)
    message = str(info.value)
    assert what in message and "at step 4;" in message
    assert "the checkpoint after step 2 is kept" in message
    assert [s for s, _, _ in saved] == [2]
    # the bad batch changed nothing: weights are those after step 3, all finite
    assert state.step == 3
    assert all(torch.isfinite(v).all() for v in state.online.net.state_dict().values())
    reference = run(make_state(), teacher_loss(), steps=3)
    assert _same(_weights(state.online.net), _weights(reference.online.net))


def test_diverging_before_any_checkpoint_says_so():
    with pytest.raises(TrainingDiverged, match="at step 1; no checkpoint was written"):
        run(make_state(), teacher_loss({0}), checkpoint=lambda s: None)


def test_skip_drops_the_batch_counts_and_reports_it(capsys):
    saved, checkpoint = snapshots()
    state = run(
        make_state(),
        teacher_loss({2, 5}, "gradient"),
        checkpoint=checkpoint,
        checkpoint_every=1,
        on_nonfinite="skip",
    )
    assert state.step == 8 and state.skipped == 2
    by_step = {step: (online, ema) for step, online, ema in saved}
    for bad in (2, 5):  # 0-based step `bad` ends at checkpoint bad + 1: nothing moved
        assert _same(by_step[bad + 1][0], by_step[bad][0])
        assert _same(by_step[bad + 1][1], by_step[bad][1])
    assert not _same(by_step[2][0], by_step[1][0])  # a good step does move the weights
    adam_steps = {float(s["step"]) for s in state.optimizer.state_dict()["state"].values()}
    assert adam_steps == {6.0}
    err = capsys.readouterr().err
    assert "step 3: the gradient norm is nan; batch skipped" in err
    assert "step 6: the gradient norm is nan; batch skipped" in err


def test_skip_keeps_the_loss_curve_over_good_batches():
    """With every batch of an interval skipped the curve gets no entry for it (no NaN)."""
    state = run(make_state(), teacher_loss({0, 1}), steps=6, log_every=2, on_nonfinite="skip")
    assert state.skipped == 2 and len(state.losses) == 2
    assert all(loss == loss for loss in state.losses)


def test_non_finite_weights_are_never_checkpointed():
    """An update can overflow with a finite loss and gradient (here lr = inf)."""
    saved, checkpoint = snapshots()
    state = make_state(optimizer=torch.optim.SGD, lr=float("inf"))
    with pytest.raises(TrainingDiverged, match="weights are not finite after step 1"):
        run(state, teacher_loss(), checkpoint=checkpoint, checkpoint_every=1)
    assert saved == []


def test_bad_on_nonfinite_value():
    with pytest.raises(ValueError, match="'stop' or 'skip'"):
        run(make_state(), teacher_loss(), on_nonfinite="ignore")


SIGNALS = [signal.SIGINT, signal.SIGTERM]
STOP_SIGNALS = pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: s.name)


def _handlers() -> dict:
    return {s: signal.getsignal(s) for s in SIGNALS}


@STOP_SIGNALS
def test_a_stop_signal_saves_the_current_step_then_stops(signal_handlers, signum):
    saved, checkpoint = snapshots()

    def interrupt_at_4(f, target, x0, step, generator):
        if step == 4:
            signal.raise_signal(signum)
        return edm_loss(f, None, x0, step, generator)

    state, before = make_state(), _handlers()
    expected = f"interrupted by {signum.name} after step 5 and saved a checkpoint"
    with pytest.raises(TrainingInterrupted, match=expected) as info:
        run(state, interrupt_at_4, steps=100, checkpoint=checkpoint, checkpoint_every=1000)
    assert info.value.signal == signum
    assert state.step == 5 and [s for s, _, _ in saved] == [5]
    assert _same(saved[0][1], _weights(state.online.net))
    assert _handlers() == before


@STOP_SIGNALS
@pytest.mark.parametrize("first", SIGNALS, ids=lambda s: s.name)  # ids read first-second
def test_a_second_stop_signal_interrupts_at_once(signal_handlers, first, signum):
    """After the first signal (either one) both get their previous handlers back."""
    handled = []

    def interrupt_twice(f, target, x0, step, generator):
        if step == 2:
            signal.raise_signal(first)
            handled.append(first)  # training took the first one
            signal.raise_signal(signum)
        return edm_loss(f, None, x0, step, generator)

    saved, checkpoint = snapshots()
    before = _handlers()
    with pytest.raises(signal_handlers[signum]) as info:
        run(make_state(), interrupt_twice, checkpoint=checkpoint)
    assert not isinstance(info.value, TrainingInterrupted) and saved == [] and handled == [first]
    assert _handlers() == before


def test_an_ignored_signal_stays_ignored_and_the_other_still_stops(signal_handlers):
    """Under nohup SIGINT is ignored: training leaves it so, and SIGTERM still saves and stops."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    handlers = []

    def terminate_at_2(f, target, x0, step, generator):
        handlers.append(signal.getsignal(signal.SIGINT))
        if step == 2:
            signal.raise_signal(signal.SIGINT)  # ignored
            signal.raise_signal(signal.SIGTERM)
        return edm_loss(f, None, x0, step, generator)

    saved, checkpoint = snapshots()
    with pytest.raises(TrainingInterrupted, match="by SIGTERM after step 3") as info:
        run(make_state(), terminate_at_2, checkpoint=checkpoint)
    assert info.value.signal == signal.SIGTERM and [s for s, _, _ in saved] == [3]
    assert handlers == [signal.SIG_IGN] * 3
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_checkpoints_by_wall_time():
    """Each step takes 7 s of a fake clock: with checkpoint_seconds=20 a checkpoint follows
    every third step (21 s after the last), besides the step-count ones and the last step."""
    now = [0.0]

    def seven_seconds(f, target, x0, step, generator):
        now[0] += 7.0
        return edm_loss(f, None, x0, step, generator)

    saved, checkpoint = snapshots()
    run(
        make_state(),
        seven_seconds,
        steps=10,
        checkpoint=checkpoint,
        checkpoint_every=8,
        checkpoint_seconds=20.0,
        clock=lambda: now[0],
    )
    # 3 and 6 by time; 8 by steps, which restarts the wait (so not 9); 10, the last step
    assert [s for s, _, _ in saved] == [3, 6, 8, 10]


def test_same_seed_same_curve_and_weights_other_seed_differs():
    a, b, c = (run(make_state(seed), teacher_loss(), steps=12, log_every=3) for seed in (1, 1, 2))
    assert len(a.losses) == 4 and a.losses == b.losses
    assert _same(_weights(a.online.net), _weights(b.online.net))
    assert _same(_weights(a.ema), _weights(b.ema))
    assert a.losses != c.losses


def test_no_clipping_is_a_huge_clip():
    """Off measures the norm without scaling the gradient, so it matches a clip never reached."""
    off, huge, tight = (
        run(make_state(), teacher_loss(), steps=12, log_every=3, grad_clip=clip)
        for clip in (None, 1e30, 1e-3)
    )
    assert off.losses == huge.losses and _same(_weights(off.online.net), _weights(huge.online.net))
    assert _same(_weights(off.ema), _weights(huge.ema))
    assert off.clipped == huge.clipped == 0
    assert tight.clipped == 12 and tight.losses != off.losses


def test_clipped_counts_the_steps_whose_norm_exceeded_the_clip():
    """A loss linear in the weights has a gradient of a chosen norm at each step; the NaN step
    is skipped and counted as skipped, not clipped."""
    norms = [0.5, 2.0, 0.9, float("nan"), 1.5, 0.1, 3.0, 0.99]

    def loss_fn(f, _target, _x0, step, _generator):
        weights = list(f.parameters())
        size = sum(w.numel() for w in weights)
        return norms[step] / size**0.5 * sum(w.sum() for w in weights)

    state = run(make_state(), loss_fn, steps=len(norms), grad_clip=1.0, on_nonfinite="skip")
    assert state.clipped == 3 and state.skipped == 1
    assert (
        run(make_state(), loss_fn, steps=len(norms), grad_clip=None, on_nonfinite="skip").clipped
        == 0
    )


@pytest.mark.parametrize("clip", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_grad_clip_value(clip):
    with pytest.raises(ValueError, match="grad_clip must be a finite number > 0 or None"):
        run(make_state(), teacher_loss(), grad_clip=clip)
