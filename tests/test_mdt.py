"""MDTv2 against the released checkpoint format and the reference MDTv2-S/2 outputs; its masking,
side-interpolater, guidance schedule and AMM plug-in; training and sampling it end to end."""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import image_generator
import image_generator_ddp
import models
import train_mask_adan
from models import count_macs, count_masked_macs, count_trainable_parameters, create_model, load_checkpoint
from models.attention import gather_token_pairs
from models.mdt import MDTv2, power_cosine_guidance_scale
from runtime.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from sampling.images import GRID_PADDING
from test_models import deterministic_state_dict, randomize
from test_train import write_features
from tiny_vae import TINY_VAE_DOWNSAMPLING, save_tiny_vae

REFERENCE_DIR = os.path.join(os.path.dirname(__file__), "reference")
with open(os.path.join(REFERENCE_DIR, "mdt_checkpoint_format.json")) as f:
    MDT_FORMAT = json.load(f)
REFERENCE_MASK_RATIO = 0.3  # the reference file's MDTv2-S/2 (decode_layer 4, the default)
TINY = dict(input_size=8, patch_size=1, in_channels=4, hidden_size=32, depth=6, num_heads=2, num_classes=10,
            decode_layer=2)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_mdt(**kwargs):
    return MDTv2(**{**TINY, "mask_ratio": REFERENCE_MASK_RATIO, **kwargs})


def inputs(batch=4, size=8, classes=10, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, size, size, generator=generator), torch.randint(0, 1000, (batch,), generator=generator),
            torch.randint(0, classes, (batch,), generator=generator))


#################################################################################
#                     Released checkpoint format and outputs                    #
#################################################################################

@pytest.mark.parametrize("name", sorted(MDT_FORMAT))
def test_state_dict_keys_shapes_and_parameter_counts_match_release(name):
    expected = MDT_FORMAT[name]
    with torch.device("meta"):
        masked = create_model(name, input_size=32, num_classes=1000, mask_ratio=REFERENCE_MASK_RATIO)
        unmasked = create_model(name)
    assert {key: list(value.shape) for key, value in masked.state_dict().items()} == expected["state_dict"]
    assert count_trainable_parameters(masked) == expected["trainable_params"]
    assert count_trainable_parameters(unmasked) == expected["trainable_params_without_mask_ratio"]


def test_official_key_set_loads_strictly_through_load_checkpoint(tmp_path):
    shapes = MDT_FORMAT["MDTv2-S/2"]["state_dict"]
    official = {key: torch.zeros(shape, dtype=torch.long) if key.endswith("relative_position_index")
                else torch.randn(shape) for key, shape in shapes.items()}
    save_checkpoint({"ema": official, "model": official}, tmp_path / "mdt_s2.pt")
    model = create_model("MDTv2-S/2")
    load_checkpoint(model, tmp_path / "mdt_s2.pt")
    torch.testing.assert_close(model.decoder_pos_embed, official["decoder_pos_embed"], rtol=0, atol=0)
    del official["mask_token"]
    save_checkpoint(official, tmp_path / "incomplete.pt")
    with pytest.raises(CheckpointError, match="1 missing keys .*mask_token"):
        load_checkpoint(model, tmp_path / "incomplete.pt", model_name="MDTv2-S/2")


@pytest.fixture(scope="module")
def reference_outputs():
    return torch.load(os.path.join(REFERENCE_DIR, "mdt_s_reference_outputs.pt"), weights_only=True)


@pytest.mark.parametrize("name,amm", [("MDTv2-S/2", ()), ("MDTv2-S/2+AMM", "default")])
def test_mdt_s_reproduces_reference_outputs(name, amm, reference_outputs, tmp_path):
    model = create_model("MDTv2-S/2", mask_ratio=REFERENCE_MASK_RATIO, amm_blocks=amm)
    assert model.amm_blocks == ([8] if amm else [])
    save_checkpoint(deterministic_state_dict(model), tmp_path / "weights.pt")
    load_checkpoint(model, tmp_path / "weights.pt")
    model.eval()
    ref = reference_outputs
    for fast in (True, False):
        model.set_fast_paths(fast)
        with torch.no_grad():
            outputs = {name: model(ref["x"], ref["t"], ref["y"]),
                       f"{name}:cfg": model.forward_with_cfg(ref["x_cfg"], ref["t_cfg"], ref["y_cfg"], ref["cfg_scale"])}
        for key, output in outputs.items():
            relative_error = (output - ref[key]).abs().max() / ref[key].abs().max()
            assert relative_error < 1e-5, (key, fast)


def test_macs_agree_with_torch_flop_counter_and_exceed_edt():
    model = randomize(tiny_mdt(fast_paths=False, amm_blocks=[3])).eval()
    x, t, y = inputs(batch=1)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t, y)
    assert counter.get_total_flops() == 2 * count_macs(model)
    with torch.device("meta"):
        ratio = count_macs(create_model("MDTv2-S/2")) / count_macs(create_model("EDT-S/2"))
    assert 2.4 < ratio < 2.6


def test_masked_pass_macs_agree_with_torch_flop_counter(monkeypatch):
    monkeypatch.setattr(models.mdt, "MASK_RATIO_SPREAD", 0.0)  # exactly mask_ratio of the tokens dropped
    model = randomize(tiny_mdt(fast_paths=False, mask_ratio=0.25)).train()
    x, t, y = inputs(batch=1)
    with FlopCounterMode(display=False) as counter:
        model(x, t, y, enable_mask=True)
    assert counter.get_total_flops() == 2 * count_masked_macs(model, kept_fraction=0.75)
    assert count_masked_macs(model, 0.75) < count_macs(model) < count_masked_macs(model, 1.0)  # the side block
    edt = create_model("EDT", input_size=8, dims=(16,) * 5, num_heads=(2,) * 5, depths=(1,) * 5, patch_size=1)
    assert count_masked_macs(edt, 0.5) == count_macs(edt)  # EDT zeroes tokens, it does not drop them


#################################################################################
#                          Masking and side-interpolater                        #
#################################################################################

def test_masked_encoder_sees_the_drawn_fraction_and_the_decoder_every_token():
    model = randomize(tiny_mdt(input_size=16)).train()
    seen = {"encoder": [], "decoder": []}
    model.en_inblocks[0].register_forward_pre_hook(lambda module, args: seen["encoder"].append(args[0].shape[1]))
    model.de_blocks[0].register_forward_pre_hook(lambda module, args: seen["decoder"].append(args[0].shape[1]))
    torch.manual_seed(0)
    with torch.no_grad():
        for _ in range(30):
            model(*inputs(batch=2, size=16), enable_mask=True)
    dropped = 1 - np.array(seen["encoder"]) / 256
    assert dropped.min() >= 0.3 - 1 / 256 and dropped.max() <= 0.5 + 1 / 256
    assert dropped.max() - dropped.min() > 0.1  # the ratio is drawn anew each call
    assert set(seen["decoder"]) == {256}


def test_masked_training_step_reaches_the_side_interpolater_and_mask_token():
    model = randomize(tiny_mdt(class_dropout_prob=0.0)).train()
    x, t, y = inputs()
    torch.manual_seed(3)
    model(x, t, y, enable_mask=True).square().mean().backward()
    side = model.sideblocks[0]
    assert side.adaLN_modulation[1].weight.grad.abs().sum() > 0 and side.attn.qkv.weight.grad.abs().sum() > 0
    assert model.mask_token.grad.abs().sum() > 0
    model.zero_grad()
    model(x, t, y).square().mean().backward()
    assert side.attn.qkv.weight.grad is None and model.mask_token.grad is None  # unmasked: not used
    with pytest.raises(ValueError, match="mask_ratio"):
        tiny_mdt(mask_ratio=None)(x, t, y, enable_mask=True)


def test_masked_forward_is_reproducible_and_keeps_the_kept_tokens_biases():
    model = randomize(tiny_mdt(class_dropout_prob=0.0)).train()
    x, t, y = inputs()
    outputs = []
    for _ in range(2):
        torch.manual_seed(11)
        with torch.no_grad():
            outputs.append(model(x, t, y, enable_mask=True))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    with torch.no_grad():
        assert not torch.allclose(outputs[0], model(x, t, y))
    bias = model.blocks[0].attn.rel_pos_bias
    ids = torch.tensor([[5, 0, 63], [7, 8, 9]])
    gathered = bias(ids)  # (2, heads, 3, 3)
    full = bias.gather()[0]
    for sample in range(2):
        torch.testing.assert_close(gathered[sample], full[:, ids[sample]][:, :, ids[sample]], rtol=0, atol=0)
    amm = torch.arange(16.0).view(4, 4)
    torch.testing.assert_close(gather_token_pairs(amm, torch.tensor([[3, 1]])), torch.tensor([[[[15.0, 13], [7, 5]]]]))


def test_masked_fast_and_plain_paths_agree_with_gradients():
    model = randomize(tiny_mdt(class_dropout_prob=0.0, amm_blocks=[1]))
    x, t, y = inputs()
    results = []
    for fast in (True, False):
        model.zero_grad()
        model.set_fast_paths(fast)
        torch.manual_seed(5)
        out = model(x, t, y, enable_mask=True)
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    for fast_grad, plain_grad in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(fast_grad, plain_grad, rtol=1e-5, atol=1e-5)


#################################################################################
#                          Guidance schedule and AMM                            #
#################################################################################

def test_power_cosine_guidance_schedule_values():
    t = torch.tensor([0, 250, 500, 999, 1000])
    scale = power_cosine_guidance_scale(4.0, t)
    expected = [4.0, 1 + 3 * (1 - math.cos(math.pi * 0.75 ** 4)) / 2, 1 + 3 * (1 - math.cos(math.pi / 16)) / 2,
                1 + 3 * (1 - math.cos(math.pi * 0.001 ** 4)) / 2, 1.0]
    torch.testing.assert_close(scale, torch.tensor(expected), rtol=1e-6, atol=1e-6)
    assert torch.all(scale[:-1] >= scale[1:])  # strongest guidance at the end of sampling


def test_cfg_guides_each_image_with_the_scale_of_its_timestep():
    model = randomize(tiny_mdt()).eval()
    x, _, _ = inputs()
    t = torch.tensor([0, 700, 0, 700])
    y = torch.tensor([1, 2, 10, 10])
    with torch.no_grad():
        plain = model(torch.cat([x[:2], x[:2]]), t, y)
        guided = model.forward_with_cfg(x, t, y, 3.0)
        every = model.forward_with_cfg(x, t, y, 3.0, cfg_channels=None)
    cond, uncond = plain.chunk(2)
    scale = power_cosine_guidance_scale(3.0, t[:2]).view(-1, 1, 1, 1)
    torch.testing.assert_close(guided[:2, :3], (uncond + scale * (cond - uncond))[:, :3])
    torch.testing.assert_close(guided[2:, :3], guided[:2, :3])
    torch.testing.assert_close(guided[:, 3:], plain[:, 3:])
    torch.testing.assert_close(every[:2], uncond + scale * (cond - uncond))
    assert scale[0] == 3.0 and scale[1] < 1.5


def test_amm_presets_and_eval_only_modulation():
    with torch.device("meta"):
        assert create_model("MDTv2-S/2", amm_blocks="default").amm_blocks == [8]
        assert create_model("MDTv2-XL/2", amm_blocks=[20, 24]).amm_blocks == [20, 24]
    with pytest.raises(ValueError, match="no AMM preset 'default' for MDTv2-B/2"):
        create_model("MDTv2-B/2", amm_blocks="default")
    with pytest.raises(ValueError, match="out of range"):
        tiny_mdt(amm_blocks=[6])
    x, t, y = inputs()
    with_amm = randomize(tiny_mdt(class_dropout_prob=0.0, amm_blocks=[1, 4]))
    without = randomize(tiny_mdt(class_dropout_prob=0.0))
    for train in (True, False):
        with_amm.train(train)
        without.train(train)
        with torch.no_grad():
            assert torch.allclose(with_amm(x, t, y), without(x, t, y), atol=1e-6) == train


#################################################################################
#                          Training and sampling                                #
#################################################################################

TINY_MDT_OPTIONS = ["--model", "MDTv2", "--hidden-size", "32", "--depth", "4", "--num-heads", "2",
                    "--patch-size", "1", "--decode-layer", "2", "--num-workers", "0", "--log-every", "2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("mdt")
    features = write_features(root / "features", latent_shape=(3, 8, 8), image_size=8, vae="none")
    results = root / "results"
    state = train_mask_adan.main(["--feature-path", features, "--results-dir", str(results), *TINY_MDT_OPTIONS,
                                  "--global-batch-size", "4", "--max-steps", "3", "--ckpt-every", "3",
                                  "--ema-warmup", "--no-flip"])
    (experiment,) = os.listdir(results)
    return {"root": root, "features": features, "state": state,
            "ckpt": os.path.join(results, experiment, "checkpoints", "0000003.pt")}


def test_training_trains_mdt_masked_and_records_its_model(trained):
    state = trained["state"]
    assert isinstance(state.model, MDTv2) and state.step == 3
    assert state.model.mask_ratio == REFERENCE_MASK_RATIO and state.model.mask_token.requires_grad
    side_state = state.optimizer.state[state.model.sideblocks[0].attn.qkv.weight]
    assert side_state and side_state["exp_avg"].abs().sum() > 0  # the masked pass trained the side block
    checkpoint = read_checkpoint(trained["ckpt"])
    assert checkpoint["model_config"]["name"] == "MDTv2"
    assert checkpoint["model_config"]["kwargs"]["mask_ratio"] == REFERENCE_MASK_RATIO


def test_training_refuses_mdt_options_that_do_not_apply(trained, tmp_path):
    base = ["--feature-path", trained["features"], "--results-dir", str(tmp_path), *TINY_MDT_OPTIONS, "--max-steps", "1"]
    with pytest.raises(SystemExit, match="--fused-mask-batch needs an EDT model"):
        train_mask_adan.main([*base, "--fused-mask-batch"])
    with pytest.raises(SystemExit, match="MDTv2's options"):
        train_mask_adan.main([*base, "--model", "DiT", "--mask-ratio", "0.5", "--no-mask"])
    assert not os.listdir(tmp_path)


def test_grid_script_samples_an_mdt_checkpoint_with_and_without_amm(trained, tmp_path):
    # Three steps leave the adaLN-Zero blocks near the identity: random weights show what the AMM does.
    checkpoint = read_checkpoint(trained["ckpt"])
    checkpoint["ema"] = randomize(models.build_model(checkpoint["model_config"])).state_dict()
    ckpt = str(tmp_path / "random.pt")
    save_checkpoint(checkpoint, ckpt)
    image_generator.main(["--ckpt", ckpt, "--class-labels", "0", "2", "--samples-per-class", "2",
                          "--num-sampling-steps", "5", "--cfg-scale", "3.0", "--amm-blocks", "2", "--compare-amm",
                          "--output-dir", str(tmp_path / "grids")])
    folder = tmp_path / "grids"
    grids = [np.asarray(Image.open(folder / name)) for name in sorted(os.listdir(folder)) if name.endswith(".png")]
    side = 2 * 8 + 3 * GRID_PADDING  # 2 classes x 2 samples of 8x8 images
    singles = [grid for grid in grids if grid.shape == (side, side, 3)]
    assert len(grids) == 3 and len(singles) == 2  # with AMM, without, and both side by side
    assert not np.array_equal(*singles)


def test_ddp_script_samples_a_released_mdt_state_dict_into_an_npz(tmp_path):
    model = create_model("MDTv2-S/2", input_size=8, num_classes=10)
    weights = randomize(model).state_dict()
    torch.save(weights, tmp_path / "mdt_s2.pt")  # the official layout: a raw state dict
    vae = save_tiny_vae(str(tmp_path / "sd-vae-ft-ema"))
    image_size = 8 * TINY_VAE_DOWNSAMPLING
    image_generator_ddp.main(["--ckpt", str(tmp_path / "mdt_s2.pt"), "--model", "MDTv2-S/2", "--amm",
                              "--image-size", str(image_size), "--num-classes", "10", "--vae-path", vae,
                              "--num-images", "3", "--num-sampling-steps", "2", "--cfg-scale", "2.0",
                              "--output-dir", str(tmp_path / "samples")])
    (folder,) = os.listdir(tmp_path / "samples")
    assert "MDTv2-S-2" in folder and "amm8" in folder
    (npz,) = [name for name in os.listdir(tmp_path / "samples" / folder) if name.endswith(".npz")]
    with np.load(tmp_path / "samples" / folder / npz) as samples:
        assert samples["arr_0"].shape == (3, image_size, image_size, 3) and samples["arr_0"].dtype == np.uint8
