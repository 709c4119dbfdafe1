"""Training that survives bad steps: a model made to output inf at one step (on one process of
two) has that step skipped everywhere, clipping is torch's clip_grad_norm_ of the global gradient,
too many bad steps stop the run or roll it back, and loss spikes are logged."""
import copy
import os
import textwrap

import pytest
import torch

import models.edt
import train_mask_adan
import training.loop
import training.step
from runtime.checkpoint import read_checkpoint
from test_train import REPO_ROOT, TINY_EDT, assert_same_tree, checkpoint_files, write_features
from launch import run_on_one_accelerate_machine

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STATE_KEYS = ("model", "ema", "opt", "schedule_sampler")
# One forward per step: one micro-batch, the full and masked passes fused.
ONE_FORWARD_PER_STEP = ["--fused-mask-batch", "--ckpt-every", "1", "--log-every", "1"]


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return write_features(tmp_path_factory.mktemp("features"))


def change_outputs_at(monkeypatch, changes):
    """EDT's forward number i (from 0) returns changes[i](output), where given."""
    forward = models.edt.EDT.forward
    calls = []

    def changed(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        calls.append(None)
        return changes.get(len(calls) - 1, lambda unchanged: unchanged)(out)
    monkeypatch.setattr(models.edt.EDT, "forward", changed)


def times(factor):
    return lambda out: out * factor


def train(features, results, *options):
    return train_mask_adan.main(["--feature-path", features, "--results-dir", str(results), *TINY_EDT,
                                 "--global-batch-size", "4", *ONE_FORWARD_PER_STEP, *options])


def checkpoint(results, step):
    _, experiment = checkpoint_files(results)
    return read_checkpoint(os.path.join(experiment, "checkpoints", f"{step:07d}.pt"))


def log_of(results):
    _, experiment = checkpoint_files(results)
    with open(os.path.join(experiment, "log.txt")) as file:
        return file.read()


def training_state(state):
    """Copies of what a step may change: parameters, EMA, the optimizer's state (its moments and
    step counts; the learning rate follows the schedule) and the timestep sampler's."""
    return copy.deepcopy({"model": state.model.state_dict(), "ema": state.ema.state_dict(),
                          "opt": state.optimizer.state_dict()["state"],
                          "schedule_sampler": state.schedule_sampler.state_dict()})


def record_states(monkeypatch, module=training.loop):
    """{step: training_state after that step}, recorded as the loop finishes each step."""
    states = {}
    watch_step = module.watch_step

    def recording(args, run, state, check, timesteps):
        states[state.step] = training_state(state)
        return watch_step(args, run, state, check, timesteps)
    monkeypatch.setattr(module, "watch_step", recording)
    return states


def assert_step_skipped(states, step):
    for key in STATE_KEYS:
        assert_same_tree(states[step - 1][key], states[step][key], f"{key} across the skipped step {step}")
    later = states[step + 1]["model"]["final_layer.linear.weight"]
    assert not torch.equal(states[step]["model"]["final_layer.linear.weight"], later)


#################################################################################
#                                  One process                                  #
#################################################################################

def test_an_inf_output_skips_exactly_that_step(features, tmp_path, monkeypatch):
    change_outputs_at(monkeypatch, {2: times(float("inf"))})  # step 3
    states = record_states(monkeypatch)
    state = train(features, tmp_path, "--max-steps", "5")
    assert state.step == 5 and state.guard.total_bad == 1
    assert_step_skipped(states, 3)
    assert checkpoint(tmp_path, 5)["guard"]["total_bad"] == 1
    log = log_of(tmp_path)
    assert "skipped step 0000003 (epoch 0, step 3 of the epoch): non-finite loss on process(es) [0]" in log
    assert "timesteps drawn: process 0: [" in log and "(step=0000003) loss nan" in log and "1 skipped" in log


def test_clipping_is_torch_clip_grad_norm_of_the_gradient(features, tmp_path, monkeypatch):
    recorded = record_clipping(monkeypatch)
    train(features, tmp_path, "--max-steps", "2", "--grad-clip", "0.05")
    assert_clipped_as_torch_does(recorded, max_norm=0.05)
    assert "grad norm" in log_of(tmp_path)


def record_clipping(monkeypatch):
    """Every step's gradients before and after training.step's gradient_norm, and its norm."""
    recorded = []
    gradient_norm = training.step.gradient_norm

    def recording(accelerator, parameters, max_norm=None):
        parameters = list(parameters)
        before = [p.grad.clone() for p in parameters if p.grad is not None]
        norm = gradient_norm(accelerator, parameters, max_norm)
        recorded.append((before, [p.grad.clone() for p in parameters if p.grad is not None], norm))
        return norm
    monkeypatch.setattr(training.step, "gradient_norm", recording)
    return recorded


def assert_clipped_as_torch_does(recorded, max_norm):
    for before, after, norm in recorded:
        parameters = [torch.nn.Parameter(torch.zeros_like(grad)) for grad in before]
        for parameter, grad in zip(parameters, before):
            parameter.grad = grad.clone()
        expected_norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        assert expected_norm > max_norm  # clipping did something
        assert torch.equal(norm, expected_norm)
        for parameter, grad in zip(parameters, after):
            assert torch.equal(parameter.grad, grad)


def test_too_many_bad_steps_stop_the_run_and_keep_the_last_checkpoint(features, tmp_path, monkeypatch):
    change_outputs_at(monkeypatch, {2: times(float("nan")), 3: times(float("inf"))})  # steps 3 and 4
    with pytest.raises(SystemExit) as stop:
        train(features, tmp_path, "--max-steps", "6", "--max-bad-steps", "2")
    message = str(stop.value.code)
    assert message.startswith("error: 2 bad steps in a row (steps 3 to 4)") and "\n" not in message
    assert "0000002.pt, is kept as it was" in message and "--rollback" in message
    files, _ = checkpoint_files(tmp_path)
    assert files == ["0000001.pt", "0000002.pt"]  # none written during or after the bad steps


def test_rollback_reloads_the_last_checkpoint_and_goes_on_past_the_bad_steps(features, tmp_path, monkeypatch):
    change_outputs_at(monkeypatch, {2: times(float("nan")), 3: times(float("inf"))})  # steps 3 and 4
    state = train(features, tmp_path, "--max-steps", "6", "--max-bad-steps", "2", "--rollback")
    assert state.step == 6 and state.guard.total_bad == 2
    log = log_of(tmp_path)
    assert "2 bad steps in a row (steps 3 to 4): rolled back to" in log and "going on from step 4, past them" in log
    files, _ = checkpoint_files(tmp_path)
    assert files == ["0000001.pt", "0000002.pt", "0000005.pt", "0000006.pt"]
    # Step 5 started from checkpoint 2's state with step 5's data, not from the state after step 2's successors.
    assert (checkpoint(tmp_path, 5)["epoch"], checkpoint(tmp_path, 5)["epoch_step"]) == (1, 1)


def test_a_loss_spike_is_logged_and_changes_nothing(features, tmp_path, monkeypatch):
    change_outputs_at(monkeypatch, {5: lambda out: out + 3.0})  # step 6: a prediction far off
    state = train(features, tmp_path / "spike", "--max-steps", "6", "--loss-spike-window", "4")
    log = log_of(tmp_path / "spike")
    assert "loss spike at step 0000006" in log and "times the running median" in log
    assert "loss spike at step 0000005" not in log and state.guard.total_bad == 0


#################################################################################
#                                Two processes                                  #
#################################################################################

TWO_PROCESS_DRIVER = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {repo!r})
    sys.path.insert(0, {tests!r})
    import pytest
    import torch
    import train_mask_adan
    from test_bad_steps import change_outputs_at, record_clipping, record_states, times

    with pytest.MonkeyPatch.context() as monkeypatch:
        # Step 3's forward returns inf on process 1 only.
        change_outputs_at(monkeypatch, {{2: times(float("inf"))}} if os.environ["RANK"] == "1" else {{}})
        recorded = record_clipping(monkeypatch)
        states = record_states(monkeypatch)
        state = train_mask_adan.main(sys.argv[2:])
    torch.save({{"model": state.model.state_dict(), "recorded": recorded, "states": states}},
               os.path.join(sys.argv[1], f"rank{{os.environ['RANK']}}.pt"))
""")



def test_two_processes_skip_the_step_one_of_them_made_inf_and_clip_alike(features, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(TWO_PROCESS_DRIVER.format(repo=REPO_ROOT, tests=os.path.dirname(__file__)))
    results = tmp_path / "results"
    completed = run_on_one_accelerate_machine(
        tmp_path, str(driver), str(tmp_path), "--feature-path", features, "--results-dir", str(results),
        *TINY_EDT, *ONE_FORWARD_PER_STEP, "--global-batch-size", "8", "--max-steps", "4", "--grad-clip", "0.05")
    assert completed.returncode == 0, completed.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    for rank in ranks:
        assert_step_skipped(rank["states"], 3)
    assert_same_tree(ranks[0]["states"], ranks[1]["states"], "rank 0 vs rank 1 after every step")
    assert_same_tree(ranks[0]["model"], ranks[1]["model"], "rank 0 vs rank 1")
    log = log_of(results)
    assert "skipped step 0000003 (epoch 1, step 1 of the epoch): non-finite loss on process(es) [1]" in log
    assert "process 0: [" in log and "process 1: [" in log
    for rank in ranks:  # the same clipping of the same all-reduced gradient on both processes
        finite = [entry for entry in rank["recorded"] if torch.isfinite(entry[2])]
        assert len(finite) == 3
        assert_clipped_as_torch_does(finite, max_norm=0.05)
    for (_, after_0, norm), (_, after_1, _) in zip(ranks[0]["recorded"], ranks[1]["recorded"]):
        if torch.isfinite(norm):
            assert_same_tree(after_0, after_1, "clipped gradients of the two processes")
