"""Every attention kernel path computes what the explicit path computes: the kernels alone, each
forced into the attention of whole models (EDT, DiT, MDTv2, the released EDT-S/2 outputs) with
zero-padded heads too, and the choice among them."""
import os
import subprocess
import sys

import pytest
import torch

import models.attention as attention_module
from models import create_model, load_checkpoint
from models.attention import attention_modulation_matrix, gather_token_pairs
import models.attention_kernels as kernels_module
from models.attention_kernels import (AMM_LSE, EXPLICIT, FLEX, SDPA, TRITON, KernelChoice, amm_attention,
                                      attention_kernel_at_inference, attention_with_lse, choose_attention_kernel,
                                      efficient_kernel_bias, explicit_attention, flex_with_lse, pad_heads,
                                      padded_head_width, sdpa_attention, triton_inference_attention)
from models.mdt import TRAINING_MASK_RATIO, MDTv2
from models.triton_attention import GPU_TILINGS
from runtime.checkpoint import save_checkpoint
from launch import REPO_ROOT
from test_models import (REFERENCE_DIR, deterministic_state_dict, model_inputs, randomize, tiny_dit,
                         tiny_edt)

RELATIVE_TOLERANCE = 1e-5  # fp32, against the explicit path


def relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def qkv(batch, heads, tokens, head_dim, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, tokens, head_dim, generator=generator) for _ in range(3)]


#################################################################################
#                               Kernels alone                                   #
#################################################################################

@pytest.mark.parametrize("head_dim", [52, 64, 72])
@pytest.mark.parametrize("bias_shape", [None, "shared", "per_sample"])
def test_sdpa_equals_explicit(head_dim, bias_shape):
    batch, heads, tokens = 3, 4, 64
    q, k, v = qkv(batch, heads, tokens, head_dim)
    bias = {None: None, "shared": torch.randn(1, heads, tokens, tokens),
            "per_sample": torch.randn(batch, heads, tokens, tokens)}[bias_shape]
    scale = head_dim ** -0.5
    expected = explicit_attention(q, k, v, bias, None, scale)
    assert relative_error(sdpa_attention(q, k, v, bias, scale), expected) < RELATIVE_TOLERANCE


@pytest.mark.parametrize("bias_shape", [None, "grid", "shared", "per_sample"])
def test_flex_attention_and_its_log_sum_exp_equal_explicit(bias_shape):
    batch, heads, tokens, head_dim = 3, 4, 64, 52
    q, k, v = qkv(batch, heads, tokens, head_dim, seed=5)
    bias = {None: None, "grid": torch.randn(tokens, tokens), "shared": torch.randn(1, heads, tokens, tokens),
            "per_sample": torch.randn(batch, heads, tokens, tokens)}[bias_shape]
    scale = head_dim ** -0.5
    scores = (q * scale) @ k.transpose(-2, -1) + (0 if bias is None else bias)
    out, lse = flex_with_lse(q, k, v, bias, scale)
    assert relative_error(out, explicit_attention(q, k, v, bias, None, scale)) < RELATIVE_TOLERANCE
    assert relative_error(lse, scores.logsumexp(-1)) < RELATIVE_TOLERANCE


def projected_qkv(batch, heads, tokens, head_dim, dtype=torch.float32):
    """q, k, v (B, heads, T, D) as views of one (B, T, 3, heads, D) projection, as the models have them."""
    projection = torch.randn(batch, tokens, 3, heads, head_dim, generator=torch.Generator().manual_seed(tokens))
    return projection.to(dtype).permute(2, 0, 3, 1, 4).unbind(0)


@pytest.mark.parametrize("tokens, head_dim, bias_shape, amm_grid", [
    (64, 52, "shared", 8), (64, 52, None, 8), (256, 52, "shared", 16), (100, 72, "per_sample", None),
    (9, 64, "grid", 3), (16, 16, None, None)])
def test_triton_attention_with_the_amm_in_one_pass_equals_explicit(tokens, head_dim, bias_shape, amm_grid):
    batch, heads = 2, 3
    q, k, v = projected_qkv(batch, heads, tokens, head_dim)
    bias = {None: None, "grid": torch.randn(tokens, tokens), "shared": torch.randn(1, heads, tokens, tokens),
            "per_sample": torch.randn(batch, heads, tokens, tokens)}[bias_shape]
    amm = None if amm_grid is None else attention_modulation_matrix(amm_grid)
    out = triton_inference_attention(q, k, v, bias, amm, head_dim ** -0.5)
    assert out.shape == (batch, heads, tokens, head_dim) and out.transpose(1, 2).is_contiguous()  # (B, T, heads, D)
    assert relative_error(out, explicit_attention(q, k, v, bias, amm, head_dim ** -0.5)) < RELATIVE_TOLERANCE


def test_triton_attention_in_half_precision_stays_close_to_fp32():
    # float16: Triton's interpreter multiplies bfloat16 operands wrongly (3.8), which only a GPU checks.
    q, k, v = projected_qkv(2, 3, 64, 52)
    bias, amm = torch.randn(1, 3, 64, 64), attention_modulation_matrix(8)
    expected = explicit_attention(q, k, v, bias, amm, 52 ** -0.5)
    half = [tensor.half() for tensor in (q, k, v)]
    out = triton_inference_attention(*half, bias, amm, 52 ** -0.5)
    assert out.dtype == torch.float16 and relative_error(out.float(), expected) < 2e-3


# Compiles the kernel for a GPU architecture with Triton's own compiler and ptxas, no GPU needed:
# what the autotuner does on the first call, in a process without the interpreter.
COMPILE_FOR_GPUS = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from models import triton_attention
kernel = triton_attention._attention_kernel.fn
tensors = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "out_ptr": "*bf16", "bias_ptr": "*fp32", "amm_ptr": "*fp32"}
signature = {name: tensors.get(name, "constexpr" if name.isupper() else "fp32" if name == "scale" else "i32")
             for name in kernel.arg_names}
for rows, columns, warps, stages in triton_attention.GPU_TILINGS:
    constants = dict(HAS_BIAS=True, HAS_AMM=True, IEEE=False, BLOCK_M=rows, BLOCK_N=columns, BLOCK_D=64)
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constants)
    for capability in map(int, sys.argv[1:]):
        compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                                  options=dict(num_warps=warps, num_stages=stages))
        print(capability, rows, columns, compiled.metadata.shared, len(compiled.asm["cubin"]))
"""


def test_triton_attention_compiles_for_a100_and_h100_at_every_tiling():
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILE_FOR_GPUS, "80", "90"], cwd=REPO_ROOT, env=environment,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    compiled = [line.split() for line in result.stdout.splitlines()]
    assert len(compiled) == 2 * len(GPU_TILINGS) and all(int(cubin_bytes) > 0 for *_, cubin_bytes in compiled)


def test_triton_tilings_fit_the_token_count():
    from models import triton_attention
    configs = triton_attention.tiling_configs(triton_attention.GPU_TILINGS)

    def widths(tokens):
        kept = triton_attention.fitting_tilings(configs, {"tokens": tokens})
        return sorted({max(config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]) for config in kept})
    assert widths(4) == widths(16) == [16]
    assert widths(64) == [16, 32, 64] and widths(256) == [16, 32, 64, 128]


@pytest.mark.parametrize("grid, variant", [(16, "256"), (8, "256"), (8, "512"), (3, "256")])
@pytest.mark.parametrize("with_bias", [True, False])
def test_amm_through_log_sum_exp_equals_explicit_modulation(grid, variant, with_bias):
    tokens = grid * grid
    q, k, v = qkv(2, 3, tokens, 52, seed=grid)
    bias = torch.randn(1, 3, tokens, tokens) if with_bias else None
    amm = attention_modulation_matrix(grid, variant)
    assert (amm.diagonal() > 0).all() and (amm == 0).any() == (grid > 3)  # cut beyond the radius from 4x4 on
    expected = explicit_attention(q, k, v, bias, amm, 52 ** -0.5)
    assert relative_error(amm_attention(q, k, v, bias, amm, 52 ** -0.5), expected) < RELATIVE_TOLERANCE


def test_amm_in_half_precision_rounds_the_float32_renormalised_output_once():
    q, k, v = (tensor.to(torch.bfloat16) for tensor in qkv(2, 3, 64, 56, seed=1))
    bias = torch.randn(1, 3, 64, 64).to(torch.bfloat16)
    amm = attention_modulation_matrix(8)
    modulated, modulated_lse = attention_with_lse(q, k, v, bias + amm.log(), 56 ** -0.5)
    _, lse = attention_with_lse(q, k, v, bias, 56 ** -0.5)
    expected = (modulated * torch.exp(modulated_lse - lse).unsqueeze(-1)).to(torch.bfloat16)
    out = amm_attention(q, k, v, bias, amm, 56 ** -0.5)
    assert out.dtype == torch.bfloat16 and out.stride() == modulated.stride()
    assert torch.equal(out, expected)


def test_amm_over_gathered_tokens_equals_explicit_modulation():
    grid, batch = 8, 2
    token_ids = torch.stack([torch.randperm(grid * grid)[:40] for _ in range(batch)])  # (B, L)
    amm = gather_token_pairs(attention_modulation_matrix(grid), token_ids)  # (B, 1, L, L)
    bias = gather_token_pairs(torch.randn(1, 3, grid * grid, grid * grid), token_ids)  # (B, 3, L, L)
    q, k, v = qkv(batch, 3, 40, 64)
    expected = explicit_attention(q, k, v, bias, amm, 0.125)
    assert relative_error(amm_attention(q, k, v, bias, amm, 0.125), expected) < RELATIVE_TOLERANCE


def test_zero_padded_heads_leave_attention_unchanged():
    batch, heads, tokens, head_dim, width = 2, 3, 16, 52, 56
    q, k, v = qkv(batch, heads, tokens, head_dim)
    bias = torch.randn(1, heads, tokens, tokens)
    padded = [pad_heads(tensor.transpose(1, 2).flatten(2), -1, head_dim, width).unflatten(-1, (heads, width))
              .transpose(1, 2) for tensor in (q, k, v)]  # (B, heads, T, width)
    assert all(torch.equal(p[..., :head_dim], t) and not p[..., head_dim:].any() for p, t in zip(padded, (q, k, v)))
    out = sdpa_attention(*padded, bias, head_dim ** -0.5)  # the true width's scale
    assert not out[..., head_dim:].any()
    expected = explicit_attention(q, k, v, bias, None, head_dim ** -0.5)
    assert relative_error(out[..., :head_dim], expected) < RELATIVE_TOLERANCE


def test_efficient_kernel_bias_is_the_same_bias_with_aligned_rows():
    q, k = torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 8)
    bias = torch.randn(1, 3, 9, 9)
    aligned = efficient_kernel_bias(bias, q, k)
    assert aligned.shape == (2, 3, 9, 9) and torch.equal(aligned[1], bias[0])
    assert aligned.stride(-1) == 1 and all(stride % 16 == 0 for stride in aligned.stride()[:-1])
    q, k = torch.randn(2, 3, 16, 8), torch.randn(2, 3, 16, 8)
    ready = torch.randn(1, 3, 16, 16)
    assert efficient_kernel_bias(ready, q, k).data_ptr() == ready.data_ptr()  # no copy when already aligned


#################################################################################
#                                 The choice                                    #
#################################################################################

def test_kernel_choice_by_device_dtype_width_and_mask():
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    # CUDA's fused kernels read 16 bytes at a time: EDT's 52-wide heads are padded in half precision.
    assert choose_attention_kernel("cuda", bf16, 52) == KernelChoice(SDPA, 56)
    assert choose_attention_kernel("cuda", fp16, 52, bias_needs_grad=True, grad_enabled=True) == KernelChoice(SDPA, 56)
    assert choose_attention_kernel("cuda", fp32, 52, bias_needs_grad=True, grad_enabled=True) == KernelChoice(SDPA, 52)
    assert choose_attention_kernel("cuda", fp32, 50) == KernelChoice(SDPA, 52)
    assert choose_attention_kernel("cuda", bf16, 64) == KernelChoice(SDPA, 64)
    assert choose_attention_kernel("cuda", bf16, 72) == KernelChoice(SDPA, 72)
    assert choose_attention_kernel("cuda", bf16, 52, amm=True) == KernelChoice(AMM_LSE, 56)
    assert choose_attention_kernel("cuda", fp16, 52, amm=True) == KernelChoice(AMM_LSE, 56)
    assert choose_attention_kernel("cuda", fp32, 52, amm=True) == KernelChoice(EXPLICIT, 52)
    assert choose_attention_kernel("cuda", bf16, 72, amm=True, grad_enabled=True) == KernelChoice(EXPLICIT, 72)
    # The CPU: never padded; the explicit path where its fused kernel has no mask gradient, and for the AMM.
    assert choose_attention_kernel("cpu", fp32, 52) == KernelChoice(SDPA, 52)
    assert choose_attention_kernel("cpu", bf16, 52) == KernelChoice(SDPA, 52)
    assert choose_attention_kernel("cpu", fp32, 52, bias_needs_grad=True, grad_enabled=True) == KernelChoice(EXPLICIT, 52)
    assert choose_attention_kernel("cpu", fp32, 64, grad_enabled=True) == KernelChoice(SDPA, 64)  # DiT trains fused
    assert choose_attention_kernel("cpu", fp32, 52, amm=True) == KernelChoice(EXPLICIT, 52)
    with attention_kernel_at_inference(FLEX):  # at inference only, wherever it is turned on
        assert choose_attention_kernel("cuda", bf16, 52, amm=True) == KernelChoice(FLEX, 56)
        assert choose_attention_kernel("cuda", fp32, 52) == KernelChoice(FLEX, 52)
        assert choose_attention_kernel("cpu", fp32, 52, amm=True) == KernelChoice(FLEX, 52)
        assert choose_attention_kernel("cuda", bf16, 52, grad_enabled=True) == KernelChoice(SDPA, 56)
        with attention_kernel_at_inference(None):
            assert choose_attention_kernel("cuda", bf16, 52) == KernelChoice(SDPA, 56)
        with attention_kernel_at_inference(TRITON):  # at the head's own width: its loads are masked
            assert choose_attention_kernel("cuda", bf16, 52, amm=True) == KernelChoice(TRITON, 52)
            assert choose_attention_kernel("cuda", bf16, 52, grad_enabled=True) == KernelChoice(SDPA, 56)
        assert choose_attention_kernel("cuda", bf16, 52) == KernelChoice(FLEX, 56)
    assert choose_attention_kernel("cuda", bf16, 52) == KernelChoice(SDPA, 56)
    with pytest.raises(ValueError, match="unknown inference attention kernel 'sdpa'; choose from flex, triton"):
        with attention_kernel_at_inference(SDPA):
            pass
    assert [padded_head_width(52, "cuda", dtype) for dtype in (bf16, fp16, fp32)] == [56, 56, 52]


def test_blocks_ask_the_choice_with_their_mode_and_autocast(monkeypatch):
    model = tiny_edt(amm_blocks=[1]).eval()
    attention, amm_block = model.blocks[0].attn, model.blocks[1].attn  # heads 16 and 24 wide
    x = torch.randn(2, 64, 32)
    with torch.no_grad():
        assert attention.kernel_choice(x) == KernelChoice(SDPA, 16)
        assert amm_block.kernel_choice(x) == KernelChoice(EXPLICIT, 24)
    model.train()
    assert attention.kernel_choice(x) == KernelChoice(EXPLICIT, 16)  # the bias needs its gradient
    assert amm_block.kernel_choice(x).kernel == EXPLICIT  # EDT: no AMM in training, and the bias's gradient
    with torch.no_grad():
        assert attention.kernel_choice(x) == KernelChoice(SDPA, 16)
    model.set_fast_paths(False)
    with torch.no_grad():
        assert attention.kernel_choice(x) == KernelChoice(EXPLICIT, 16)
    asked = []
    monkeypatch.setattr(attention_module, "choose_attention_kernel",
                        lambda *args, **kwargs: asked.append((args, kwargs)) or KernelChoice(SDPA, 16))
    model.set_fast_paths(True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        attention.kernel_choice(x)
    assert asked == [(("cpu", torch.bfloat16, 16), dict(amm=False, bias_needs_grad=False, grad_enabled=False))]


#################################################################################
#                       Each path forced into whole models                      #
#################################################################################

FORCED_PATHS = {  # name: (kernel, extra head width)
    "sdpa": (SDPA, 0),
    "sdpa-padded": (SDPA, 4),
    "amm-lse": (AMM_LSE, 0),
    "amm-lse-padded": (AMM_LSE, 8),
}


def force_kernel(monkeypatch, kernel, extra_width):
    """Every attention call at its head width plus extra_width (zero-padded): AMM blocks through
    amm-lse when that is forced, else explicitly; the others through sdpa."""
    def forced(device_type, dtype, head_dim, amm=False, bias_needs_grad=False, grad_enabled=False):
        if amm:
            return KernelChoice(AMM_LSE if kernel == AMM_LSE else EXPLICIT, head_dim + extra_width)
        return KernelChoice(SDPA, head_dim + extra_width)
    monkeypatch.setattr(attention_module, "choose_attention_kernel", forced)


def outputs_and_gradients(model, inputs, **forward_kwargs):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # the same masks in every run
    out = model(*inputs, **forward_kwargs)
    out.square().mean().backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("path", ["sdpa", "sdpa-padded"])
@pytest.mark.parametrize("build, forward_kwargs", [
    (tiny_edt, {}), (tiny_edt, {"enable_down_mask": True}), (tiny_dit, {}),
    (lambda **kw: create_model("MDTv2", input_size=16, hidden_size=48, depth=4, num_heads=4, decode_layer=2,
                               num_classes=10, mask_ratio=TRAINING_MASK_RATIO, **kw), {"enable_mask": True}),
], ids=["edt", "edt-masked", "dit", "mdt-masked"])
def test_forced_paths_equal_explicit_in_training_outputs_and_gradients(monkeypatch, path, build, forward_kwargs):
    model = randomize(build(class_dropout_prob=0.0)).train()
    inputs = model_inputs()
    model.set_fast_paths(False)
    expected_out, expected_grads = outputs_and_gradients(model, inputs, **forward_kwargs)
    model.set_fast_paths(True)
    force_kernel(monkeypatch, *FORCED_PATHS[path])
    out, grads = outputs_and_gradients(model, inputs, **forward_kwargs)
    assert relative_error(out, expected_out) < RELATIVE_TOLERANCE
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        assert relative_error(grads[name], grad) < RELATIVE_TOLERANCE, name


@pytest.mark.parametrize("path", list(FORCED_PATHS))
@pytest.mark.parametrize("build", [tiny_edt, tiny_dit], ids=["edt", "dit"])
def test_forced_paths_equal_explicit_at_inference(monkeypatch, path, build):
    model = randomize(build(amm_blocks=[1, 3])).eval()
    inputs = model_inputs()
    with torch.no_grad():
        model.set_fast_paths(False)
        expected = model(*inputs)
        model.set_fast_paths(True)
        force_kernel(monkeypatch, *FORCED_PATHS[path])
        assert relative_error(model(*inputs), expected) < RELATIVE_TOLERANCE
        assert relative_error(model(*inputs), expected) < RELATIVE_TOLERANCE  # with the kept padded weights


INFERENCE_KERNEL_CALLS = {FLEX: "flex_inference_attention", TRITON: "triton_inference_attention"}


@pytest.mark.parametrize("precision", ["tf32", "ieee"])
def test_triton_attention_reads_the_float32_matmul_precision_as_the_scripts_set_it(precision):
    q, k, v = projected_qkv(1, 2, 16, 52)
    before, torch.backends.cuda.matmul.fp32_precision = torch.backends.cuda.matmul.fp32_precision, precision
    try:  # runtime.distributed's API, after which the legacy flag raises
        out = triton_inference_attention(q, k, v, None, None, 52 ** -0.5)  # interpreted: IEEE products either way
    finally:
        torch.backends.cuda.matmul.fp32_precision = before
    assert relative_error(out, explicit_attention(q, k, v, None, None, 52 ** -0.5)) < RELATIVE_TOLERANCE


def test_triton_attention_is_one_operator_to_torch_compile():
    from models import triton_attention
    q, k, v = projected_qkv(2, 3, 64, 52)
    bias, amm, scale = torch.randn(1, 3, 64, 64), attention_modulation_matrix(8), 52 ** -0.5
    torch.library.opcheck(triton_attention.compiled_attention, (q, k, v, bias, amm, scale))
    eager = triton_attention.attention(q, k, v, bias, amm, scale)
    compiled = torch.compile(triton_attention.attention, fullgraph=True)(q, k, v, bias, amm, scale)
    assert compiled.stride() == eager.stride()  # (B, T, heads, D) memory, as the fake tensor says
    assert relative_error(compiled, explicit_attention(q, k, v, bias, amm, scale)) < RELATIVE_TOLERANCE


@pytest.mark.parametrize("kernel", [FLEX, TRITON])
@pytest.mark.parametrize("build", [
    lambda: tiny_edt(amm_blocks=[1, 3]), lambda: tiny_dit(amm_blocks=[1, 3]),
    lambda: create_model("MDTv2", input_size=16, hidden_size=48, depth=4, num_heads=4, decode_layer=2, num_classes=10),
], ids=["edt", "dit", "mdt"])
def test_inference_kernels_equal_explicit_and_leave_training_alone(monkeypatch, build, kernel):
    model = randomize(build()).eval()
    inputs = model_inputs()
    calls = []
    kernel_call = getattr(attention_module, INFERENCE_KERNEL_CALLS[kernel])
    monkeypatch.setattr(attention_module, INFERENCE_KERNEL_CALLS[kernel],
                        lambda *args: calls.append(args[4] is not None) or kernel_call(*args))
    with torch.no_grad():
        model.set_fast_paths(False)
        expected = model(*inputs)
        model.set_fast_paths(True)
        attention_calls = []
        for module in model.modules():
            if isinstance(module, attention_module.Attention):
                module.register_forward_hook(lambda module, args, out: attention_calls.append(module.amm_active()))
        with attention_kernel_at_inference(kernel):
            out = model(*inputs)
    assert calls == attention_calls and any(calls) == (not isinstance(model, MDTv2))  # every call, AMM blocks too
    assert relative_error(out, expected) < RELATIVE_TOLERANCE
    inference_calls = len(calls)
    with attention_kernel_at_inference(kernel):
        model.train()(*inputs)
    assert len(calls) == inference_calls and len(attention_calls) > inference_calls  # autograd keeps the defaults


def test_padded_path_in_bf16_stays_close_to_fp32(monkeypatch):
    model = randomize(tiny_edt(amm_blocks=[1])).eval()
    inputs = model_inputs()
    with torch.no_grad():
        expected = model(*inputs)
        force_kernel(monkeypatch, AMM_LSE, 8)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(*inputs)
    assert relative_error(out.float(), expected) < 3e-2


@pytest.mark.parametrize("path", [*FORCED_PATHS, FLEX, TRITON])
def test_released_edt_s_outputs_through_each_path(monkeypatch, path, tmp_path):
    reference = torch.load(os.path.join(REFERENCE_DIR, "edt_s_reference_outputs.pt"), weights_only=True)
    model = create_model("EDT-S/2")
    save_checkpoint(deterministic_state_dict(model), tmp_path / "weights.pt")
    load_checkpoint(model, tmp_path / "weights.pt")
    if path in (FLEX, TRITON):
        monkeypatch.setattr(kernels_module, "inference_kernel", path)
    else:
        force_kernel(monkeypatch, *FORCED_PATHS[path])
    with torch.no_grad():
        out = model.eval()(reference["x"], reference["t"], reference["y"])
        guided = model.forward_with_cfg(reference["x_cfg"], reference["t_cfg"], reference["y_cfg"],
                                        reference["cfg_scale"])
    assert relative_error(out, reference["EDT-S/2"]) < RELATIVE_TOLERANCE
    assert relative_error(guided, reference["EDT-S/2:cfg"]) < RELATIVE_TOLERANCE
