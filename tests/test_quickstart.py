"""The README's main command end to end, on a shorter schedule: every script of the pipeline
runs for real (two-process extraction and sampling included) on the digits set, started from
another folder than the repository's, whose ./quickstart_output receives everything."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import quickstart
from digits.dataset import digits_as_uint8
from latents.shards import read_manifest

CHANCE = 1 / 10


def test_quickstart_runs_the_whole_pipeline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # The suite's other worker has the second core: one thread per step's process uses the
    # cores better than two that wait for each other (100 training steps, start-up included, on
    # two idle cores: 49 CPU seconds on two threads, 36 on one; the same metrics either way).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "quickstart_output"  # the default --output-dir, in the working directory
    results = quickstart.main(["--train-steps", "400", "--num-images", "200"])  # the default sampler
    with open(out / "digits_metrics.json") as f:
        assert json.load(f) == results
    real = results["real held-out"]
    assert real["accuracy"] > 0.9  # the judge itself is competent
    for scale in quickstart.CFG_SCALES:
        row = results[f"samples cfg {scale}"]
        assert row["images"] == 200
        assert row["accuracy"] > 3 * CHANCE, row
    assert results["samples cfg 2.0"]["accuracy"] >= results["samples cfg 1.0"]["accuracy"]

    npz_files = sorted((out / "samples").glob("*/samples_200x8x8x3.npz"))
    assert len(npz_files) == 2
    with np.load(npz_files[0]) as npz:
        assert npz["arr_0"].dtype == np.uint8 and npz["arr_0"].shape == (200, 8, 8, 3)
        assert np.bincount(npz["arr_1"], minlength=10).tolist() == [20] * 10
    comparison = [name for name in os.listdir(out / "grids") if name.endswith("-vs-noamm-seed-0.png")]
    assert len(comparison) == 1
    width, height = Image.open(out / "grids" / comparison[0]).size
    assert height > 10 * 8 * quickstart.GRID_ZOOM and width > 2 * height


def test_quickstart_steps_run_from_any_folder(tmp_path, monkeypatch):
    """The cheap steps for real from outside the repository: the digits, the extraction (a
    repository script, on one process) and the evaluation (a repository module)."""
    monkeypatch.chdir(tmp_path)
    args = quickstart.parse_args(["--processes", "1"])
    quickstart.prepare_output_dir(args.output_dir)
    train_dir = quickstart.write_digits(args.output_dir)
    quickstart.extract(args, train_dir, os.path.join(args.output_dir, "features"))
    (train_images, _), _ = digits_as_uint8()
    assert read_manifest(tmp_path / "quickstart_output" / "features")["count"] == len(train_images)

    (_, _), (held_out, held_out_labels) = digits_as_uint8()
    npz_files = []
    for scale in quickstart.CFG_SCALES:  # real digits stand in for the samples
        npz_files.append(str(tmp_path / f"real-{scale}.npz"))
        np.savez(npz_files[-1], np.repeat(held_out[..., None], 3, axis=-1), held_out_labels)
    results = quickstart.evaluate(npz_files, "quickstart_output/digits_metrics.json")
    assert results["samples cfg 1.0"]["accuracy"] == results["real held-out"]["accuracy"] > 0.9
    assert (tmp_path / "quickstart_output" / "digits_metrics.json").exists()


def test_quickstart_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="was not made by the quickstart"):
        quickstart.main(["--output-dir", str(tmp_path)])
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_sampling_takes_one_batch_per_process_where_it_fits():
    assert quickstart.sampling_batch_size(1000, 2) == 500  # the default: as before, two full batches
    assert quickstart.sampling_batch_size(1000, 1) == 500
    assert quickstart.sampling_batch_size(200, 2) == 100  # not 500 rows of which 400 are filler
    assert quickstart.sampling_batch_size(3, 2) == 2
