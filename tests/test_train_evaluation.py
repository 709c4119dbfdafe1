"""FID during training: a tiny pixel-space EDT scored on the stand-in Inception graph, the same
FID on one process and two, the history continued on resume, each of several guidance scales as
it is alone, failures logged, bad options."""
import json
import os

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from threadpoolctl import threadpool_limits

import evaluation_standin_graph as standin
import train_mask_adan
import training.evaluation
from evaluations.inception import GRAPH_FILENAME
from models.kept_tensor import kept_tensors
from runtime.checkpoint import read_checkpoint
from test_train import TINY_EDT, assert_same_tree, checkpoint_files, expect_error, write_features
from launch import run_on_one_accelerate_machine, script

pytestmark = pytest.mark.usefixtures("one_torch_thread", "one_blas_thread")

NUM_REFERENCE = 24
IMAGE_SIZE = 8


@pytest.fixture(scope="module")
def one_blas_thread():
    """The FID's eigendecompositions on one thread: threaded LAPACK slows down severalfold on shared cores."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return write_features(tmp_path_factory.mktemp("pixels"), latent_shape=(3, IMAGE_SIZE, IMAGE_SIZE),
                          image_size=IMAGE_SIZE, vae="none")


@pytest.fixture(scope="module")
def evaluation_files(tmp_path_factory):
    """The stand-in graph and a reference batch of images without precomputed statistics."""
    folder = tmp_path_factory.mktemp("evaluation")
    standin.write_graph(str(folder / GRAPH_FILENAME))
    images = np.random.default_rng(21).integers(0, 256, size=(NUM_REFERENCE, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    np.savez(folder / "reference.npz", images)
    return str(folder / GRAPH_FILENAME), str(folder / "reference.npz")


def evaluation_options(evaluation_files, every=2):
    graph, reference = evaluation_files
    # The EMA stays the initial model (decay 1), which every number of processes builds alike.
    return ["--eval-every", str(every), "--eval-reference", reference, "--inception-graph", graph,
            "--eval-images", "10", "--eval-batch-size", "4", "--eval-sampler", "ddim",
            "--eval-sampling-steps", "3", "--ema-decay", "1.0"]


def train_options(features, results, *options):
    return ["--feature-path", features, "--results-dir", str(results), *TINY_EDT, "--no-flip",
            "--global-batch-size", "4", *options]


def read_history(experiment):
    with open(os.path.join(experiment, "checkpoints", training.evaluation.HISTORY_NAME)) as file:
        return json.load(file)["evaluations"]


def test_fid_is_logged_kept_and_continued_on_resume(features, evaluation_files, tmp_path):
    results = tmp_path / "results"
    state = train_mask_adan.main(train_options(features, results, "--max-steps", "4", "--ckpt-every", "2",
                                               *evaluation_options(evaluation_files)))
    assert all(kept.tensor is None for kept in kept_tensors(state.ema))  # freed for the training steps
    files, experiment = checkpoint_files(results)
    history = read_history(experiment)
    assert [entry["step"] for entry in history] == [2, 4]
    assert history[0]["fid"] == history[1]["fid"] > 0  # the same (frozen) EMA model, the same number
    assert history[0]["inception_score"] > 1 and history[0]["num_images"] == 10
    assert history[0]["sampler"] == "ddim" and history[0]["sampling_steps"] == 3
    log = open(os.path.join(experiment, "log.txt")).read()
    assert f"(step=0000004) fid {history[1]['fid']:.4f}, inception score" in log
    events = EventAccumulator(os.path.join(experiment, "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("eval/fid")] == [2, 4]
    assert [event.step for event in events.Scalars("eval/inception_score")] == [2, 4]

    # Evaluating leaves the training itself as it is, bit for bit.
    train_mask_adan.main(train_options(features, tmp_path / "plain", "--max-steps", "4", "--ema-decay", "1.0"))
    plain = read_checkpoint(os.path.join(checkpoint_files(tmp_path / "plain")[1], "checkpoints", "0000004.pt"))
    evaluated = read_checkpoint(os.path.join(experiment, "checkpoints", "0000004.pt"))
    assert_same_tree(evaluated["model"], plain["model"], "model")
    assert_same_tree(evaluated["rng"], plain["rng"], "rng")

    # Resumed from step 2, the run replaces the evaluation of step 4 and goes on.
    train_mask_adan.main(train_options(features, results, "--max-steps", "6", "--ckpt-every", "2",
                                       "--resume", os.path.join(experiment, "checkpoints", files[0]),
                                       *evaluation_options(evaluation_files)))
    resumed = read_history(experiment)
    assert [entry["step"] for entry in resumed] == [2, 4, 6]
    assert resumed[0] == history[0] and resumed[1]["fid"] == history[1]["fid"]
    resumed_events = EventAccumulator(os.path.join(experiment, "tensorboard"))  # the first step 4 purged
    resumed_events.Reload()
    assert [event.step for event in resumed_events.Scalars("eval/fid")] == [2, 4, 6]


def test_fid_is_the_same_on_one_and_two_processes(features, evaluation_files, tmp_path):
    options = [*evaluation_options(evaluation_files), "--max-steps", "2"]
    train_mask_adan.main(train_options(features, tmp_path / "one", *options))
    completed = run_on_one_accelerate_machine(tmp_path, script("train_mask_adan.py"),
                                              *train_options(features, tmp_path / "two", *options))
    assert completed.returncode == 0, completed.stderr[-3000:]
    (one,), (two,) = read_history(checkpoint_files(tmp_path / "one")[1]), read_history(checkpoint_files(tmp_path / "two")[1])
    assert one["step"] == two["step"] == 2
    assert one["fid"] == two["fid"] and one["inception_score"] == two["inception_score"]


def test_several_guidance_scales_are_each_evaluated_as_alone(features, evaluation_files, tmp_path):
    # The EMA follows the model, whose output depends on the label after its first steps.
    options = [*evaluation_options(evaluation_files), "--max-steps", "2", "--ema-decay", "0"]
    for name, scales in (("alone", ["2"]), ("several", ["1", "2"])):
        train_mask_adan.main(train_options(features, tmp_path / name, *options, "--eval-cfg-scale", *scales))
    (alone,) = read_history(checkpoint_files(tmp_path / "alone")[1])
    experiment = checkpoint_files(tmp_path / "several")[1]
    unguided, guided = read_history(experiment)
    assert [entry["cfg_scale"] for entry in (unguided, guided)] == [1.0, 2.0] and guided["step"] == 2
    assert (guided["fid"], guided["inception_score"]) == (alone["fid"], alone["inception_score"])
    assert unguided["fid"] != guided["fid"]
    log = open(os.path.join(experiment, "log.txt")).read()
    assert f"fid {guided['fid']:.4f}" in log and "steps, cfg 2, " in log and "steps, cfg 1, " in log
    events = EventAccumulator(os.path.join(experiment, "tensorboard"))
    events.Reload()
    assert {tag for tag in events.Tags()["scalars"] if tag.startswith("eval/")} == {
        "eval/fid_cfg1", "eval/fid_cfg2", "eval/inception_score_cfg1", "eval/inception_score_cfg2"}
    assert events.Scalars("eval/fid_cfg2")[0].value == pytest.approx(guided["fid"])


def test_a_failed_evaluation_is_logged_and_training_goes_on(features, evaluation_files, tmp_path, monkeypatch):
    def failing(self, ema, indices, cfg_scale):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(training.evaluation.TrainingEvaluator, "sample_features", failing)
    state = train_mask_adan.main(train_options(features, tmp_path, "--max-steps", "2",
                                               *evaluation_options(evaluation_files, every=1)))
    assert state.step == 2 and state.ema.training  # the EMA is back in its mode
    files, experiment = checkpoint_files(tmp_path)
    log = open(os.path.join(experiment, "log.txt")).read()
    for step in (1, 2):
        assert (f"(step={step:07d}) evaluation at cfg 1 failed, training goes on: process 0: "
                f"RuntimeError: CUDA out of memory") in log
    assert files == ["0000002.pt"]
    assert not os.path.exists(os.path.join(experiment, "checkpoints", training.evaluation.HISTORY_NAME))


def test_bad_evaluation_options_fail_before_any_work(features, evaluation_files, tmp_path):
    graph, reference = evaluation_files
    results = tmp_path / "results"
    base = train_options(features, results)
    (tmp_path / "text.npz").write_text("not a zip")
    cases = [
        (["--eval-images", "100"], "--eval-images needs --eval-every"),
        (["--eval-every", "2"], "--eval-every needs --eval-reference"),
        (["--eval-every", "2", "--eval-reference", reference, "--eval-images", "1"], "--eval-images must be at least 2"),
        (["--eval-every", "2", "--eval-reference", str(tmp_path / "text.npz"), "--inception-graph", graph],
         "not an npz file"),
        (["--eval-every", "2", "--eval-reference", reference, "--inception-graph", str(tmp_path / "none.pb")],
         "Inception graph not found"),
        (["--eval-every", "2", "--eval-reference", reference, "--inception-graph", graph, "--eval-sampler", "unipc",
          "--eval-sampling-steps", "1000"], "--eval-sampler unipc --eval-sampling-steps 1000"),
        (["--eval-every", "2", "--eval-reference", reference, "--eval-cfg-scale", "2", "0.5"],
         "--eval-cfg-scale must be at least 1"),
        (["--eval-every", "2", "--eval-reference", reference, "--eval-cfg-scale", "1", "2", "1"],
         "--eval-cfg-scale lists a scale twice: 1 2 1"),
    ]
    for options, message in cases:
        expect_error([*base, *options], message)
    assert not results.exists()
