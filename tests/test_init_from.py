"""--init-from: fine-tuning from a checkpoint with other classes, another grid or another VAE.

The pure initialisation on a tiny EDT (class rows by name, null row, unconditional target, grid
and channel changes, width and depth misfits), the real EDT-S/2 from a released-style state
dict, and train_mask_adan.py end to end.
"""
import os

import pytest
import torch

import models
import train_mask_adan
from runtime.checkpoint import read_checkpoint
from training.config import ConfigError
from training.initialise import CLASS_TABLE, initialise_from, read_initial_weights

from test_train import TINY_EDT, checkpoint_files, expect_error, write_features

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEED = 0
SYNSETS = [f"n{index:08d}" for index in range(1000)]
GRID_KEYS = ("pos_embed", "relative_position_bias_table")


def tiny_edt(num_classes, input_size=8, in_channels=4, dims=(32,) * 5, depths=(1,) * 5, **kwargs):
    """A tiny EDT built from SEED, as build_model builds a run's model."""
    torch.manual_seed(SEED)
    return models.create_model("EDT", dims=dims, num_heads=(2,) * 5, depths=depths, patch_size=1,
                               input_size=input_size, in_channels=in_channels, num_classes=num_classes, **kwargs)


@pytest.fixture(scope="module")
def released():
    """A 1000-class tiny EDT's weights, from another seed than the models it initialises."""
    torch.manual_seed(SEED + 1)
    return models.create_model("EDT", dims=(32,) * 5, num_heads=(2,) * 5, depths=(1,) * 5, patch_size=1,
                               input_size=8, num_classes=1000).state_dict()


def assert_loaded_except(model, state_dict, fresh, new_keys):
    """Every tensor equals the checkpoint's, except new_keys (and the class table), which equal `fresh`'s."""
    for key, tensor in model.state_dict().items():
        if key == CLASS_TABLE:
            continue
        expected = fresh.state_dict()[key] if key in new_keys else state_dict[key]
        assert torch.equal(tensor, expected), key


#################################################################################
#                          The initialisation itself                            #
#################################################################################

def test_class_rows_are_kept_by_name_and_the_null_row_is_carried(released):
    names = [SYNSETS[7], "cat", SYNSETS[3]]
    model, fresh = tiny_edt(3), tiny_edt(3)
    report = initialise_from(model, released, names, SYNSETS)
    table, theirs = model.y_embedder.embedding_table.weight, released[CLASS_TABLE]
    assert table.shape == (4, 32)  # 3 classes and the null row
    assert torch.equal(table[0], theirs[7]) and torch.equal(table[2], theirs[3])
    assert torch.equal(table[1], fresh.y_embedder.embedding_table.weight[1])
    assert torch.equal(table[3], theirs[1000])
    assert_loaded_except(model, released, fresh, new_keys=())
    assert len(report.loaded) == report.total - 1
    assert report.lines("ckpt [ema]") == [
        f"initialised from ckpt [ema]: {report.total - 1} of {report.total} tensors loaded",
        f"class table: 2 of 3 classes kept by name ({SYNSETS[7]}, {SYNSETS[3]}), 1 new (cat), null row carried"]


def test_without_checkpoint_names_no_class_row_is_kept(released):
    model, fresh = tiny_edt(3), tiny_edt(3)
    report = initialise_from(model, released, ["ant", "bee", "cat"], None)
    table = model.y_embedder.embedding_table.weight
    assert torch.equal(table[:3], fresh.y_embedder.embedding_table.weight[:3])
    assert torch.equal(table[3], released[CLASS_TABLE][1000])
    assert report.class_line.startswith("no class row kept (the checkpoint names no classes")


def test_an_unconditional_model_takes_the_null_row(released):
    model = tiny_edt(1, class_dropout_prob=0.0)
    report = initialise_from(model, released, ["all"], SYNSETS)
    assert torch.equal(model.y_embedder.embedding_table.weight, released[CLASS_TABLE][1000:])
    assert report.class_line == "unconditional, its row is the checkpoint's null row"


def test_another_grid_keeps_the_new_grid_tensors(released):
    model, fresh = tiny_edt(1000, input_size=16), tiny_edt(1000, input_size=16)
    report = initialise_from(model, released, SYNSETS, SYNSETS)
    grid_keys = [key for key in model.state_dict() if key.endswith(GRID_KEYS)]
    assert sorted(report.new_grid) == sorted(grid_keys) and len(grid_keys) == 10
    assert_loaded_except(model, released, fresh, new_keys=grid_keys)
    assert torch.equal(model.y_embedder.embedding_table.weight, released[CLASS_TABLE])
    assert report.lines("ckpt")[2].startswith("new (grid 8 -> 16): pos_embed, blocks.0.attn.rel_pos_bias.")


def test_another_vae_keeps_the_new_channel_tensors(released):
    model, fresh = tiny_edt(1000, in_channels=8), tiny_edt(1000, in_channels=8)
    report = initialise_from(model, released, SYNSETS, SYNSETS)
    channel_keys = ["x_embedder.proj.weight", "final_layer.linear.weight", "final_layer.linear.bias"]
    assert report.new_channels == channel_keys and report.channels == (4, 8)
    assert_loaded_except(model, released, fresh, new_keys=channel_keys)


@pytest.mark.parametrize("size, differs", [(dict(dims=(64,) * 5), "the width (or patch size) differs"),
                                           (dict(depths=(1, 1, 1, 1, 2)), "the depth differs")])
def test_another_width_or_depth_stops_with_one_line(released, size, differs):
    model = tiny_edt(1000, **size)
    before = {key: tensor.clone() for key, tensor in model.state_dict().items()}
    with pytest.raises(ConfigError) as raised:
        initialise_from(model, released, SYNSETS, SYNSETS, source="ckpt", model_name="EDT")
    message = str(raised.value)
    assert message.startswith(f"ckpt does not fit this EDT: {differs}; ") and "\n" not in message, message
    assert all(torch.equal(tensor, before[key]) for key, tensor in model.state_dict().items())


def test_edt_s2_from_a_released_state_dict(tmp_path):
    torch.manual_seed(SEED + 1)
    torch.save(models.create_model("EDT-S/2", num_classes=1000).state_dict(), tmp_path / "released.pt")
    state_dict, names = read_initial_weights(str(tmp_path / "released.pt"), "ema", None, "EDT-S/2")
    torch.manual_seed(SEED)
    model = models.create_model("EDT-S/2", num_classes=3)
    report = initialise_from(model, state_dict, ["ant", "bee", "cat"], names)
    assert names is None and len(report.loaded) == report.total - 1
    for key, tensor in model.state_dict().items():
        assert key == CLASS_TABLE or torch.equal(tensor, state_dict[key]), key
    assert torch.equal(model.y_embedder.embedding_table.weight[3], state_dict[CLASS_TABLE][1000])


#################################################################################
#                                train_mask_adan.py                             #
#################################################################################

@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return write_features(tmp_path_factory.mktemp("features"))  # classes class0, class1, class2


@pytest.fixture(scope="module")
def released_file(released, tmp_path_factory):
    """{"ema": weights} of a 1000-class model, and a names file that puts class2 at row 5 and
    class0 at row 9."""
    folder = tmp_path_factory.mktemp("released")
    torch.save({"ema": released}, folder / "released.pt")
    names = [f"other{index}" for index in range(1000)]
    names[5], names[9] = "class2", "class0"
    (folder / "names.txt").write_text("\n".join(names) + "\n")
    return str(folder / "released.pt"), str(folder / "names.txt")


def train(features, results, *options):
    return train_mask_adan.main(["--feature-path", features, "--results-dir", str(results), *TINY_EDT,
                                 "--global-batch-size", "4", "--max-steps", "2", *options])


def test_fine_tuning_run(features, released_file, released, tmp_path):
    path, names = released_file
    state = train(features, tmp_path, "--init-from", path, "--init-class-names", names, "--ckpt-every", "2")
    assert state.step == 2
    files, experiment = checkpoint_files(tmp_path)
    log = open(os.path.join(experiment, "log.txt")).read()
    assert f"initialised from {path} [ema]: " in log
    assert "class table: 2 of 3 classes kept by name (class0, class2), 1 new (class1), null row carried" in log
    ema_table = state.ema.y_embedder.embedding_table.weight  # two updates of decay 0.9999 from the copy
    theirs = released[CLASS_TABLE]
    assert torch.allclose(ema_table[[0, 2, 3]], theirs[[9, 5, 1000]], atol=1e-4)
    checkpoint = read_checkpoint(os.path.join(experiment, "checkpoints", files[-1]))
    assert checkpoint["class_names"] == ["class0", "class1", "class2"]
    assert checkpoint["args"].init_from == path

    train(features, tmp_path, "--init-from", path, "--resume", "latest", "--max-steps", "3")
    log = open(os.path.join(experiment, "log.txt")).read()
    assert f"resuming, so --init-from {path} is not applied" in log


def test_bad_init_input_stops_with_one_line(features, released_file, tmp_path):
    path, names = released_file
    base = ["--feature-path", features, "--results-dir", str(tmp_path / "results"), *TINY_EDT,
            "--global-batch-size", "4"]
    expect_error([*base, "--init-key", "model"], "--init-key needs --init-from")
    expect_error([*base, "--init-class-names", names], "--init-class-names needs --init-from")
    expect_error([*base, "--init-from", str(tmp_path / "missing.pt")], "checkpoint not found")
    expect_error([*base, "--init-from", path, "--init-key", "model"], "has no 'model' weights")
    expect_error([*base, "--init-from", path, "--init-class-names", str(tmp_path / "missing.txt")],
                 "--init-class-names")
    wide = [*base[:base.index("--dims")], "--dims", *["64"] * 5, *base[base.index("--dims") + 6:]]
    expect_error([*wide, "--init-from", path], "the width (or patch size) differs")
    torch.save({"model_config": models.model_config("EDT-S/2"), "ema": read_checkpoint(path)["ema"]},
               tmp_path / "named.pt")
    expect_error([*base, "--init-from", str(tmp_path / "named.pt")], "holds a EDT-S/2 model, this run trains EDT")
    dit = ["--model", "DiT", "--hidden-size", "32", "--depth", "2", "--num-heads", "2", "--no-mask"]
    expect_error([*base, *dit, "--init-from", path], "the model differs")
    assert not (tmp_path / "results").exists()  # nothing was written
