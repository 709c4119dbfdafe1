"""EDT and DiT against the released checkpoint format and the reference EDT-S/2 outputs."""
import argparse
import collections
import copy
import fractions
import gc
import json
import math
import os
import zipfile
import zlib

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from models import (ALL_MODELS, EDT_models, build_model, count_macs, count_trainable_parameters, create_model,
                    load_checkpoint, model_config)
from models import attention as attention_module
from models.dit import DiT
from models.edt import EDT
from models.mdt import MDTv2
from models.kept_tensor import forget_kept_tensors, kept_tensors
from runtime.checkpoint import CheckpointError, read_checkpoint, save_checkpoint

REFERENCE_DIR = os.path.join(os.path.dirname(__file__), "reference")
with open(os.path.join(REFERENCE_DIR, "checkpoint_format.json")) as f:
    CHECKPOINT_FORMAT = json.load(f)


def tiny_edt(**kwargs):
    config = dict(input_size=16, patch_size=2, in_channels=4, dims=(32, 48, 64, 48, 32), num_heads=(2, 2, 4, 2, 2),
                  depths=(1, 1, 1, 2, 2), num_classes=10)
    return EDT(**{**config, **kwargs})


def tiny_dit(**kwargs):
    config = dict(input_size=16, patch_size=2, in_channels=4, hidden_size=32, depth=4, num_heads=2, num_classes=10)
    return DiT(**{**config, **kwargs})


def randomize(model, seed=0):
    """Non-zero weights everywhere (adaLN-Zero would make every block the identity)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def deterministic_state_dict(model):
    """SPEC.md's recipe: crc32-seeded normal weights * 0.05, sin-cos tables kept. Taken literally,
    as the reference files were made: MDT's integer index tables get such values too, which
    load_state_dict truncates to zeros."""
    state = {}
    for key, value in model.state_dict().items():
        if "pos_embed" in key:
            state[key] = value
        else:
            generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
            state[key] = torch.randn(value.shape, generator=generator, dtype=torch.float64).float() * 0.05
    return state


def model_inputs(batch=4, channels=4, size=16, classes=10, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    y = torch.randint(0, classes, (batch,), generator=generator)
    return x, t, y


#################################################################################
#                        Released checkpoint format                             #
#################################################################################

@pytest.mark.parametrize("name", sorted(CHECKPOINT_FORMAT))
def test_state_dict_keys_shapes_and_parameter_count_match_release(name):
    with torch.device("meta"):
        model = create_model(name, input_size=32, num_classes=1000)
    expected = CHECKPOINT_FORMAT[name]
    shapes = {key: list(value.shape) for key, value in model.state_dict().items()}
    assert shapes == expected["state_dict"]
    assert count_trainable_parameters(model) == expected["trainable_params"]
    if "amm_block_indices" in expected:
        assert model.amm_blocks == expected["amm_block_indices"]


@pytest.mark.parametrize("name", ["EDT-S/2", "EDT-B/2", "EDT-XL/2"])
def test_macs_equal_reference_counter(name):
    with torch.device("meta"):
        model = create_model(name)
    assert count_macs(model) == CHECKPOINT_FORMAT[name]["reference_macs_per_forward"]


@pytest.mark.parametrize("build", [tiny_edt, tiny_dit], ids=["edt", "dit"])
def test_macs_agree_with_torch_flop_counter(build):
    # The plain path: FlopCounterMode counts neither the CPU flash kernel nor the oneDNN fused MLP.
    model = build(fast_paths=False, amm_blocks=[1]).eval()
    x, t, y = model_inputs(batch=1)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t, y)
    assert counter.get_total_flops() == 2 * count_macs(model)


def test_registry_names_and_errors():
    for size in ("S", "B", "XL"):
        assert f"EDT-{size}/2" in EDT_models and f"EDT-{size}/2_noAMM" in EDT_models
    assert {f"DiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)} <= set(ALL_MODELS)
    with pytest.raises(ValueError, match="unknown model"):
        create_model("EDT-M/2")
    with torch.device("meta"):
        assert create_model("EDT-S/2_noAMM").amm_blocks == []
        assert create_model("EDT-S/2", amm_blocks="high_cfg").amm_blocks == [8]
        assert create_model("EDT-XL/2", amm_blocks="high_cfg").amm_blocks == [24]
        assert create_model("EDT-B/2", amm_blocks=[3, 5]).amm_blocks == [3, 5]
        assert create_model("DiT-XL/2", amm_blocks="default").amm_blocks == [15, 17, 19, 22, 24]
        assert create_model("DiT-S/2").amm_blocks == []
    with pytest.raises(ValueError, match="out of range"):
        tiny_edt(amm_blocks=[7])
    with pytest.raises(ValueError, match="symmetric"):
        tiny_edt(dims=(32, 48, 64, 48, 64))


#################################################################################
#                           Reference outputs                                   #
#################################################################################

@pytest.fixture(scope="module")
def reference_outputs():
    return torch.load(os.path.join(REFERENCE_DIR, "edt_s_reference_outputs.pt"), weights_only=True)


@pytest.mark.parametrize("name", ["EDT-S/2", "EDT-S/2_noAMM"])
def test_edt_s_reproduces_reference_outputs(name, reference_outputs, tmp_path):
    model = create_model(name)
    path = tmp_path / "weights.pt"
    save_checkpoint(deterministic_state_dict(model), path)
    load_checkpoint(model, path)
    model.eval()
    ref = reference_outputs
    for fast in (True, False):  # the plain path does the reference's operations one by one
        model.set_fast_paths(fast)
        with torch.no_grad():
            outputs = {
                name: model(ref["x"], ref["t"], ref["y"]),
                f"{name}:cfg": model.forward_with_cfg(ref["x_cfg"], ref["t_cfg"], ref["y_cfg"], ref["cfg_scale"]),
            }
        for key, output in outputs.items():
            expected = ref[key]
            assert output.shape == expected.shape
            relative_error = (output - expected).abs().max() / expected.abs().max()
            assert relative_error < 1e-5, (key, fast)


def test_cfg_guides_first_three_channels_or_all(reference_outputs):
    model = randomize(tiny_edt()).eval()
    x, t, _ = model_inputs(batch=4)
    y = torch.tensor([1, 2, 10, 10])  # conditional half, then the null class
    with torch.no_grad():
        plain = model(torch.cat([x[:2], x[:2]]), t, y)
        three = model.forward_with_cfg(x, t, y, 3.0)
        every = model.forward_with_cfg(x, t, y, 3.0, cfg_channels=None)
    cond, uncond = plain.chunk(2)
    guided = uncond + 3.0 * (cond - uncond)
    torch.testing.assert_close(three[:2, :3], guided[:, :3])
    torch.testing.assert_close(three[2:, :3], guided[:, :3])
    torch.testing.assert_close(three[:, 3:], plain[:, 3:])
    torch.testing.assert_close(every[:2], guided)


#################################################################################
#                       Attention Modulation Matrix                             #
#################################################################################

AMM_FUNCTIONS = {  # of the cosine, the release's two functions
    "256": lambda cosine: np.exp(cosine) / 2,
    "512": lambda cosine: 1.3 * cosine,
}


@pytest.mark.parametrize("variant", sorted(AMM_FUNCTIONS))
@pytest.mark.parametrize("n", [4, 8, 16, 32])
def test_amm_follows_formula(n, variant):
    amm = attention_modulation_matrix_numpy = attention_module.attention_modulation_matrix(n, variant).double().numpy()
    rows, cols = np.divmod(np.arange(n * n), n)
    distance = np.hypot(rows[:, None] - rows[None], cols[:, None] - cols[None])
    formula = AMM_FUNCTIONS[variant](np.cos(2 * np.pi * distance / (4 * (n - 1) * math.sqrt(2))))
    radius = math.sqrt((n - 1) ** 2 + 4)
    inside = distance <= radius + 1e-9
    np.testing.assert_allclose(attention_modulation_matrix_numpy[inside], formula[inside], rtol=1e-6)
    assert np.all(amm[~inside] == 0)
    assert np.all(amm[inside] > 0)
    np.testing.assert_array_equal(amm, amm.T)


def test_amm_needs_a_grid_with_the_radius_token():
    with pytest.raises(ValueError, match="at least 3x3"):
        attention_module.attention_modulation_matrix(2)
    with pytest.raises(ValueError, match="unknown AMM variant '1024'"):
        attention_module.attention_modulation_matrix(8, "1024")


def test_512_models_default_to_the_released_512_amm():
    with torch.device("meta"):
        for name, blocks_256, blocks_512 in (("EDT-S/2", [7, 10], [10]), ("EDT-B/2", [7, 10], [10]),
                                             ("EDT-XL/2", [23, 25], [23, 25])):
            at_256, at_512 = create_model(name), create_model(name, input_size=64)
            assert (at_256.amm_blocks, at_256.amm_variant) == (blocks_256, "256")
            assert (at_512.amm_blocks, at_512.amm_variant) == (blocks_512, "512")
            assert at_512.blocks[blocks_512[0]].attn.grid_size == 32
        assert create_model("EDT-S/2", input_size=64, amm_variant="256").amm_variant == "256"
        assert create_model("EDT-S/2", amm_variant="512").amm_variant == "512"
        assert create_model("DiT-XL/2", input_size=64, amm_blocks="default").amm_variant == "256"
        assert create_model("MDTv2-S/2", amm_blocks="default", amm_variant="512").amm_variant == "512"
    with pytest.raises(ValueError, match="unknown AMM variant"):
        tiny_edt(amm_blocks=[3], amm_variant="1024")


def test_amm_variant_changes_the_matrix_and_the_outputs():
    model = randomize(tiny_edt(input_size=64, amm_blocks=[5])).eval()  # last stage: grid 32, as EDT /2 at 512
    assert model.amm_variant == "512"
    torch.testing.assert_close(model.blocks[5].attn.amm, attention_module.attention_modulation_matrix(32, "512"))
    x, t, y = model_inputs(size=64)
    with torch.no_grad():
        out_512 = model(x, t, y)
        model.set_amm_blocks([5], variant="256")
        out_256 = model(x, t, y)
    assert model.amm_variant == "256" and out_256.shape == (4, 8, 64, 64)
    torch.testing.assert_close(model.blocks[5].attn.amm, attention_module.attention_modulation_matrix(32, "256"))
    assert not torch.allclose(out_256, out_512, atol=1e-4)
    model.set_amm_blocks([5, 6])  # keeps the variant
    assert model.blocks[6].attn.amm_variant == "256"


def test_edt_amm_only_in_eval_mode_and_dit_amm_always():
    x, t, y = model_inputs()
    for build, train_mode_differs in ((tiny_edt, False), (tiny_dit, True)):
        with_amm = randomize(build(class_dropout_prob=0.0, amm_blocks=[1, 3]))
        without = randomize(build(class_dropout_prob=0.0))
        for train in (True, False):
            with_amm.train(train)
            without.train(train)
            with torch.no_grad():
                same = torch.allclose(with_amm(x, t, y), without(x, t, y), atol=1e-6)
            assert same == (train and not train_mode_differs)


def test_amm_and_relative_index_are_built_once_and_not_saved(monkeypatch):
    model = tiny_edt(amm_blocks=[3])
    assert not any("amm" in key or key.endswith("relative_position_index") for key in model.state_dict())
    buffer = model.blocks[3].attn.amm
    index = model.blocks[3].attn.rel_pos_bias.relative_position_index
    calls = []
    monkeypatch.setattr(attention_module, "attention_modulation_matrix", lambda n: calls.append(n))
    monkeypatch.setattr(attention_module, "relative_position_index", lambda n: calls.append(n))
    model.eval()
    with torch.no_grad():
        model(*model_inputs())
        model(*model_inputs())
    assert calls == []
    assert model.blocks[3].attn.amm is buffer and model.blocks[3].attn.rel_pos_bias.relative_position_index is index
    monkeypatch.undo()
    model.set_amm_blocks([3, 4])
    assert model.blocks[3].attn.amm is buffer and model.amm_blocks == [3, 4]


def test_relative_position_index_matches_beit_layout():
    n = 5
    index = attention_module.relative_position_index(n)
    for query, key in [(0, 0), (0, 24), (24, 0), (7, 13), (12, 3)]:
        dh, dw = query // n - key // n, query % n - key % n
        assert index[query, key] == (dh + n - 1) * (2 * n - 1) + (dw + n - 1)


#################################################################################
#                           Fast and plain paths                                #
#################################################################################

def fast_and_plain_results(model, run):
    results = []
    for fast in (True, False):
        model.zero_grad()
        model.set_fast_paths(fast)
        results.append(run(model))
    model.set_fast_paths(True)
    return results


@pytest.mark.parametrize("build", [tiny_edt, tiny_dit], ids=["edt", "dit"])
def test_fast_and_plain_paths_agree_in_training(build):
    model = randomize(build(class_dropout_prob=0.0, amm_blocks=[1]))
    x, t, y = model_inputs()

    def outputs_and_gradients(model):
        out = model(x, t, y)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    (out_fast, grads_fast), (out_plain, grads_plain) = fast_and_plain_results(model, outputs_and_gradients)
    torch.testing.assert_close(out_fast, out_plain, rtol=1e-5, atol=1e-5)
    for grad_fast, grad_plain in zip(grads_fast, grads_plain):
        torch.testing.assert_close(grad_fast, grad_plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("build", [tiny_edt, tiny_dit], ids=["edt", "dit"])
def test_fast_and_plain_paths_agree_at_inference(build):
    model = randomize(build(amm_blocks=[1])).eval()
    x, t, y = model_inputs()
    with torch.no_grad():
        out_fast, out_plain = fast_and_plain_results(model, lambda model: model(x, t, y))
    torch.testing.assert_close(out_fast, out_plain, rtol=1e-5, atol=1e-5)


def kernels_called(model, *inputs):
    """{kernel name: number of calls} in one forward without autograd."""
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        model(*inputs)
    return collections.Counter(event.name for event in profiler.events())


def test_cpu_inference_takes_the_fused_kernels_and_training_the_explicit_bias_path():
    model = randomize(tiny_edt(amm_blocks=[1])).eval()
    inputs = model_inputs()
    fast = kernels_called(model, *inputs)
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in fast  # the 4-D bias mask is accepted
    # Every Linear but the stacked modulations: qkv, proj, fc1 with GELU and fc2 of each block, the
    # timestep MLP, down-sampling, up-sampling, concat and final Linears.
    assert fast["mkldnn::_linear_pointwise"] == 4 * len(model.blocks) + 9
    assert "aten::gelu" not in fast
    model.set_fast_paths(False)
    plain = kernels_called(model, *inputs)
    assert "aten::scaled_dot_product_attention" not in plain and "mkldnn::_linear_pointwise" not in plain
    model.set_fast_paths(True)
    model.train()
    x = torch.randn(2, 64, 32)
    assert model.blocks[0].attn.kernel_choice(x).kernel == "explicit"  # the bias needs its gradient
    with torch.no_grad():
        assert model.blocks[0].attn.kernel_choice(x).kernel == "sdpa"


def test_compiled_inference_equals_eager():
    # torch.compile must see neither the kept bias nor the oneDNN MLP (Inductor cannot lower it on
    # parameters). One block, an AMM one: whole models are compiled by the sampling and training tests.
    model = randomize(tiny_edt(amm_blocks=[1])).eval()
    block = model.blocks[1]
    x, c = torch.randn(4, 16, 48), torch.randn(4, 32)  # stage 1: a 4x4 grid of 48 channels
    with torch.no_grad():
        modulation = block.adaLN_modulation(c)
        eager = block(x, modulation)
        block.compile()
        compiled = block(x, modulation)
    assert block._compiled_call_impl is not None
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def tiny_mdt():
    return MDTv2(input_size=16, patch_size=2, in_channels=4, hidden_size=32, depth=4, num_heads=2, num_classes=10,
                 decode_layer=2)


@pytest.mark.parametrize("build", [tiny_edt, tiny_dit, tiny_mdt], ids=["edt", "dit", "mdt"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_tokens_reach_the_blocks_in_row_major_memory(build, bf16):
    """The patch convolution gives its tokens as a transposed view; the first block, compiled or
    not, must see the layout the later ones see (or compiling it takes a graph of its own)."""
    model = randomize(build())
    x = torch.randn(2, 4, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        tokens = model.embed_patches(x)
        transposed = model.x_embedder(x)
        assert not transposed.is_contiguous()
        assert tokens.is_contiguous() and torch.equal(tokens, transposed + model.pos_embed)


def test_kept_inference_tensors_follow_every_change_of_their_parameters():
    model = randomize(tiny_edt()).eval()
    bias = model.blocks[0].attn.rel_pos_bias
    fc1 = model.blocks[0].mlp.fc1
    x, t, y = model_inputs()

    def fast_equals_plain():
        fast, plain = fast_and_plain_results(model, lambda model: model(x, t, y))
        torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
        return fast

    with torch.no_grad():
        before = fast_equals_plain()
        assert bias() is bias()  # gathered once
        assert fc1.packed_weight.get(fc1.weight, None) is fc1.packed_weight.get(fc1.weight, None)  # packed once
        modulation = model.blocks[0].adaLN_modulation[1]
        stacked = model.stacked_weights([module.adaLN_modulation[1] for module in model.modulated_modules])
        assert stacked is model.stacked_weights([module.adaLN_modulation[1] for module in model.modulated_modules])
        state = {key: value.clone() for key, value in model.state_dict().items()}
        bias.relative_position_bias_table.add_(0.5)
        fc1.weight.mul_(2)
        modulation.bias.add_(0.5)
        assert torch.equal(bias(), bias.gather())
        changed = fast_equals_plain()
        model.load_state_dict(state)
        assert torch.equal(bias(), bias.gather())
        torch.testing.assert_close(model(x, t, y), before, rtol=0, atol=0)
        copied = copy.deepcopy(model)  # kept tensors are not copied, the copy derives its own
        assert copied.blocks[0].mlp.fc1.packed_weight.tensor is None
        torch.testing.assert_close(copied(x, t, y), before, rtol=0, atol=0)
        model.double()
        assert bias().dtype == torch.float64
        torch.testing.assert_close(model(x.double(), t, y), before.double(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(changed, before)
    assert bias().requires_grad  # with autograd, gathered afresh


def test_forgetting_kept_tensors_frees_them_and_changes_no_output():
    model = randomize(tiny_edt()).eval()
    x, t, y = model_inputs()
    with torch.no_grad():
        fp32 = model(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(x, t, y)
        fc1 = model.blocks[0].mlp.fc1
        some = [fc1.packed_weight, fc1.autocast_parameters, model.blocks[0].attn.rel_pos_bias.kept_bias,
                *model.kept_modulation_weights.values()]
        assert all(kept.tensor is not None for kept in some)
        assert {id(kept) for kept in some} <= {id(kept) for kept in kept_tensors(model)}
        forget_kept_tensors(model)
        assert all(kept.tensor is None for kept in kept_tensors(model))
        torch.testing.assert_close(model(x, t, y), fp32, rtol=0, atol=0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(model(x, t, y), bf16, rtol=0, atol=0)


#################################################################################
#                             Masked training                                   #
#################################################################################

def test_down_masks_drop_fractions_in_their_ranges():
    model = randomize(tiny_edt()).train()
    dropped = {0: [], 1: []}

    def recorder(stage):
        def hook(module, args):
            dropped[stage].append(1 - args[2].mean().item())
        return hook

    for stage, down in enumerate(model.down_blocks):
        down.register_forward_pre_hook(recorder(stage))
    batch = 256
    x, t, y = model_inputs(batch=batch)
    torch.manual_seed(0)
    with torch.no_grad():
        for _ in range(40):
            model(x, t, y, enable_down_mask=True)
    for stage, (low, high) in enumerate([(0.4, 0.5), (0.1, 0.2)]):
        fractions = np.array(dropped[stage])
        tolerance = 4 * math.sqrt(0.25 / (batch * (8 >> stage) ** 2))  # binomial noise of the token count
        assert fractions.min() > low - tolerance and fractions.max() < high + tolerance
        assert fractions.min() < low + 0.3 * (high - low) and fractions.max() > high - 0.3 * (high - low)


def test_stage0_mask_replaces_dropped_tokens_by_position_embedding():
    model = randomize(tiny_edt(depths=(5, 1, 1, 1, 1), stage0_mask_block=4, class_dropout_prob=0.0)).train()
    seen = []
    model.blocks[4].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    x, t, y = model_inputs(batch=32)
    torch.manual_seed(1)
    with torch.no_grad():
        model(x, t, y, enable_down_mask=True)
        model(x, t, y)
    masked, plain = seen
    replaced = (masked == model.pos_embed).all(dim=-1)  # (N, T)
    assert 0.15 - 0.05 < replaced.float().mean() < 0.25 + 0.05
    torch.testing.assert_close(masked[~replaced], plain[~replaced])


def test_masked_forward_is_reproducible_and_differs_from_plain():
    model = randomize(tiny_edt(class_dropout_prob=0.0)).train()
    x, t, y = model_inputs()
    outputs = []
    for _ in range(2):
        torch.manual_seed(123)
        with torch.no_grad():
            outputs.append(model(x, t, y, enable_down_mask=True))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    with torch.no_grad():
        train_plain = model(x, t, y)
        assert not torch.allclose(outputs[0], train_plain)
        model.eval()
        torch.testing.assert_close(train_plain, model(x, t, y), rtol=0, atol=0)


def test_batched_full_and_masked_forward_equals_two_forwards():
    model = randomize(tiny_edt(depths=(5, 1, 1, 1, 1), stage0_mask_block=4, class_dropout_prob=0.0)).train()
    x, t, y = model_inputs()
    batch = len(x)
    results = []
    for batched in (False, True):
        model.zero_grad()
        torch.manual_seed(7)
        if batched:
            out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y]), enable_down_mask=True, mask_start=batch)
            full, masked = out[:batch], out[batch:]
        else:
            full, masked = model(x, t, y), model(x, t, y, enable_down_mask=True)
        (full.square().mean() + masked.square().mean()).backward()
        results.append((full.detach(), masked.detach(), [p.grad.clone() for p in model.parameters()]))
    for plain, batched in zip(results[0][:2], results[1][:2]):
        torch.testing.assert_close(batched, plain, rtol=1e-5, atol=1e-5)
    for plain, batched in zip(results[0][2], results[1][2]):
        torch.testing.assert_close(batched, plain, rtol=1e-5, atol=1e-5)


#################################################################################
#                             Checkpoint loading                                #
#################################################################################

def test_load_checkpoint_raw_and_training_layouts(tmp_path):
    source_model, target = randomize(tiny_edt(), seed=1), tiny_edt()
    ema_model = randomize(tiny_edt(), seed=2)
    training = {"model": source_model.state_dict(), "ema": ema_model.state_dict(), "opt": {},
                "args": argparse.Namespace(model="tiny", epochs=3)}
    save_checkpoint(training, tmp_path / "train.pt")
    save_checkpoint(source_model.state_dict(), tmp_path / "raw.pt")
    checkpoint = load_checkpoint(target, tmp_path / "train.pt")
    assert checkpoint["args"].epochs == 3
    torch.testing.assert_close(target.state_dict(), ema_model.state_dict())
    load_checkpoint(target, tmp_path / "train.pt", key="model")
    torch.testing.assert_close(target.state_dict(), source_model.state_dict())
    load_checkpoint(target, tmp_path / "raw.pt")
    torch.testing.assert_close(target.state_dict(), source_model.state_dict())


def resident_kib(kind):
    """This process's resident memory of one kind ("RssAnon", "RssFile"), in KiB (Linux)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(f"{kind}:"))


def test_read_checkpoint_maps_zip_checkpoints_and_reads_legacy_ones(tmp_path):
    ema, optimizer_state = {"w": torch.randn(1000)}, torch.randn(16 * 2 ** 20)  # 64 MiB of optimizer state
    path = tmp_path / "train.pt"
    save_checkpoint({"ema": ema, "opt": {"state": optimizer_state}, "args": argparse.Namespace(epochs=1)}, path)
    gc.collect()
    before = resident_kib("RssAnon")
    checkpoint = read_checkpoint(path)
    torch.testing.assert_close(checkpoint["ema"]["w"], ema["w"])
    assert resident_kib("RssAnon") - before < 16 * 1024  # the optimizer state stays in the file
    torch.testing.assert_close(checkpoint["opt"]["state"], optimizer_state)  # read on use
    # Copy-on-write: a change to a loaded tensor stays in memory, and a file saved over the
    # checkpoint leaves what was loaded as it was.
    checkpoint["ema"]["w"].zero_()
    torch.testing.assert_close(read_checkpoint(path)["ema"]["w"], ema["w"])
    save_checkpoint({"ema": {"w": torch.ones(1000)}}, path)
    torch.testing.assert_close(checkpoint["opt"]["state"], optimizer_state)

    legacy = tmp_path / "legacy.pt"  # the format before torch 1.6, which cannot be mapped
    torch.save({"ema": ema, "args": argparse.Namespace(epochs=1)}, legacy, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(legacy)
    legacy_checkpoint = read_checkpoint(legacy)
    assert legacy_checkpoint["args"].epochs == 1
    torch.testing.assert_close(legacy_checkpoint["ema"]["w"], ema["w"])


def test_load_checkpoint_errors(tmp_path):
    save_checkpoint(tiny_dit().state_dict(), tmp_path / "dit.pt")
    with pytest.raises(CheckpointError, match=r"does not fit EDT-tiny: \d+ missing keys .*blocks\.0\.attn\.rel_pos_bias"):
        load_checkpoint(tiny_edt(), tmp_path / "dit.pt", model_name="EDT-tiny")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tiny_edt(), tmp_path / "missing.pt")
    save_checkpoint({"model": tiny_edt().state_dict()}, tmp_path / "no_ema.pt")
    with pytest.raises(CheckpointError, match="no 'ema' weights"):
        load_checkpoint(tiny_edt(), tmp_path / "no_ema.pt")
    torch.save({"ema": tiny_edt().state_dict(), "args": fractions.Fraction(1, 3)}, tmp_path / "unsafe.pt")
    with pytest.raises(CheckpointError, match="cannot read checkpoint .* safely"):
        load_checkpoint(tiny_edt(), tmp_path / "unsafe.pt")


def test_custom_model_rebuilds_from_its_recorded_config():
    config = model_config("EDT", input_size=8, patch_size=1, in_channels=3, dims=(16,) * 5, num_heads=(2,) * 5,
                          depths=(1,) * 5, num_classes=10, amm_blocks=[3])
    first, second = build_model(config), build_model(json.loads(json.dumps(config)))
    assert first.amm_blocks == second.amm_blocks == [3]
    assert {k: v.shape for k, v in first.state_dict().items()} == {k: v.shape for k, v in second.state_dict().items()}
