"""The speed benchmark's fast paths compute what the plain paths compute, and the script runs."""
import functools
import gzip
import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch

import models.attention
import models.attention_kernels
from benchmarks import attention_kernels, compare_trees, gpu_floor, gpu_profile, gpu_protocol, launch_count, speed
from benchmarks.plain_dit import plain_dit_like
from diffusion import create_diffusion, create_named_schedule_sampler
from models import create_model
from models.macs import count_macs
from runtime.ema import EmaUpdate, create_ema
from training import flat_adan
from training.step import micro_batch_losses, per_sample_losses

TOLERANCE = dict(atol=1e-5, rtol=1e-5)


def tiny_edt():
    torch.manual_seed(0)
    model = create_model("EDT", input_size=8, patch_size=1, dims=(16, 24, 32, 24, 16), num_heads=(2,) * 5,
                         depths=(1,) * 5, num_classes=10, amm_blocks=(3,))
    for param in model.parameters():  # leave the zero-initialised adaLN-Zero state: every path matters
        param.data.normal_(0, 0.1)
    model.y_embedder.dropout_prob = 0.0  # the label drops are the one draw the two steps make differently
    return model.train()


class NoiseFeeder:
    """A diffusion whose training_losses take their noise from a list, in call order, so that
    the two-pass and the fused step see the same noise (the fused step gets it concatenated)."""

    def __init__(self, diffusion, noises):
        self.diffusion, self.noises = diffusion, noises

    def training_losses(self, model, x, t, model_kwargs):
        noise = self.noises.pop(0)
        return self.diffusion.training_losses(model, x, t, model_kwargs=model_kwargs, noise=noise)


def step_losses_and_grads(model, noises, x, y, fused):
    diffusion = create_diffusion(timestep_respacing="")
    sampler = create_named_schedule_sampler("uniform", diffusion)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same timesteps and the same token masks in both steps
    losses_of = functools.partial(per_sample_losses, model, NoiseFeeder(diffusion, noises),
                                  mask_flag="enable_down_mask", fused=fused)
    full, masked = micro_batch_losses(losses_of, sampler, x, y)
    (full + masked).backward()
    return full.detach(), masked.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_fused_masked_step_equals_two_pass_step_in_losses_and_gradients():
    model = tiny_edt()
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 8, 8, generator=generator)
    y = torch.randint(0, 10, (3,), generator=generator)
    noise_full, noise_masked = torch.randn(2, *x.shape, generator=generator)

    two_pass = step_losses_and_grads(model, [noise_full, noise_masked], x, y, fused=False)
    fused = step_losses_and_grads(model, [torch.cat([noise_full, noise_masked])], x, y, fused=True)

    torch.testing.assert_close(fused[0], two_pass[0], **TOLERANCE)
    torch.testing.assert_close(fused[1], two_pass[1], **TOLERANCE)
    assert not torch.allclose(two_pass[0], two_pass[1])  # the mask did change the second loss
    for name, grad in two_pass[2].items():
        torch.testing.assert_close(fused[2][name], grad, **TOLERANCE, msg=name)


def test_foreach_ema_equals_per_parameter_loop():
    model = tiny_edt()
    ema_foreach, ema_loop = create_ema(model), create_ema(model)
    update_ema = EmaUpdate(ema_foreach, model)
    for step in range(3):
        for param in model.parameters():
            param.data.add_(torch.randn_like(param), alpha=0.1)
        model.pos_embed.add_(1.0)  # buffers are copied, not averaged
        if step == 1:  # the kept tensor lists follow weights loaded in place
            model.load_state_dict({name: param + 1.0 for name, param in model.named_parameters()}, strict=False)
        update_ema(0.9)
        speed.per_parameter_ema(ema_loop, model, 0.9)
    for (name, a), b in zip(ema_foreach.state_dict().items(), ema_loop.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=name)
    assert not torch.allclose(ema_foreach.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    torch.testing.assert_close(ema_foreach.pos_embed, model.pos_embed, atol=0, rtol=0)
    without_buffers = torch.nn.Linear(2, 2)  # as the release's EDT
    EmaUpdate(create_ema(without_buffers), without_buffers)(0.9)


def test_plain_dit_loads_our_dit_weights_and_computes_the_same():
    torch.manual_seed(0)
    ours = create_model("DiT-S/2", input_size=8, depth=2).eval()
    for param in ours.parameters():
        param.data.normal_(0, 0.05)
    plain = plain_dit_like("DiT-S/2", input_size=8)
    plain.blocks = plain.blocks[:2]
    plain.load_state_dict(ours.state_dict(), strict=True)
    plain.eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 1000])
    with torch.no_grad():
        torch.testing.assert_close(plain(x, t, y), ours(x, t, y), **TOLERANCE)
        torch.testing.assert_close(plain.forward_with_cfg(x, t, y, 1.5), ours.forward_with_cfg(x, t, y, 1.5),
                                   **TOLERANCE)


TINY_RUN = ["--batch-size", "2", "--latent-size", "8", "--warmup", "0", "--repeats", "2",
            "--sampling-steps", "2", "--threads", "1"]


def test_script_compares_fast_paths_and_writes_json(tmp_path):
    out = tmp_path / "speed.json"
    speed.main(["--model", "EDT-S/2_noAMM", "--compare-fast-paths", *TINY_RUN, "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["settings"]["batch_size"] == 2 and result["settings"]["load_average"] is not None
    assert set(result["variants"]) == {"fast", "plain"}
    for variant in result["variants"].values():
        assert variant["parameters"] > 1e6 and variant["macs_per_sample"] > 1e6
        assert set(variant["measurements"]) == set(speed.MEASUREMENTS)
        for measurement in variant["measurements"].values():
            assert measurement["repeats"] == len(measurement["seconds"])
            assert measurement["min_s"] <= measurement["median_s"] <= measurement["max_s"]
            assert measurement["rate"] > 0 and measurement["peak_memory_mb"] > 0
    assert set(result["ratios"]) == set(speed.MEASUREMENTS)
    fast, plain = result["variants"]["fast"], result["variants"]["plain"]
    assert fast["fast_paths"] and not plain["fast_paths"]
    assert fast["fast_attention_blocks"] == 12 and plain["fast_attention_blocks"] == 0  # EDT-S has 12 blocks


def test_script_compares_two_models(capsys):
    result = speed.main(["--model", "DiT-S/2", "--compare", "plain:DiT-S/2", *TINY_RUN,
                         "--skip-training", "--skip-sampling"])
    assert set(result["ratios"]) == {"inference", "inference_cfg"}
    assert result["variants"]["plain:DiT-S/2"]["parameters"] == result["variants"]["DiT-S/2"]["parameters"]
    assert result["variants"]["plain:DiT-S/2"]["fast_attention_blocks"] == 12  # timm's fused_attn
    assert "ratio DiT-S/2 / plain:DiT-S/2 inference" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--model", "EDT-Q/2"], "unknown model"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--compare", "DiT-S/2", "--compare-fast-paths"], "exclusive"),
])
def test_bad_arguments_fail_with_one_line(argv, message):
    with pytest.raises(SystemExit) as error:
        speed.parse_args(argv)
    assert message in str(error.value)


#################################################################################
#                        GPU protocol and attention kernels                     #
#################################################################################

# A stand-in for a checkout of the release: its models_edt.py with the released interface
# (EDT_models, forward(x, t, y, enable_down_mask=...), the released state dict).
RELEASE_STAND_IN = '''
from models import create_model
from models.macs import count_macs

EDT_models = {"EDT-S/2": lambda **kwargs: create_model("EDT-S/2", **kwargs)}
'''


def test_gpu_protocol_tiny_on_cpu_writes_the_table_with_ratios_and_checks(tmp_path):
    release = tmp_path / "release"
    release.mkdir()
    (release / "models_edt.py").write_text(RELEASE_STAND_IN)
    result = gpu_protocol.main(["--out", str(tmp_path / "out"), "--tiny", "--device", "cpu", "--release-code",
                                str(release), "--warmup", "0", "--repeats", "1", "--training-batch", "2"])
    rows = {(row["measurement"], row["precision"], row["other"]): row for row in result["rows"]}
    expected_others = {"MDTv2-S/2": ("inference", "train_masked"), "DiT-S/2": ("inference",),
                       "release:EDT-S/2": ("inference", "train_masked")}
    assert set(rows) == {(measurement, precision, other) for other, measurements in expected_others.items()
                         for measurement in measurements for precision in ("fp32", "bf16")}
    for row in rows.values():
        assert row["ratio"] > 0 and row["ours_tflops"] > 0 and 0 < row["ours_matmul_fraction"]
        assert row["ratio"] == pytest.approx(row["other_ms"] / row["ours_ms"])
    assert rows["inference", "fp32", "MDTv2-S/2"]["paper"] == 2.29
    assert rows["train_masked", "bf16", "MDTv2-S/2"]["paper"] == 3.93
    assert rows["inference", "fp32", "release:EDT-S/2"]["mac_ratio"] == 1.0
    assert result["matmul_tflops"] > 0
    checks = result["checks"]
    assert all(checks[f"{name} bf16 gradients finite"] for name in ("EDT-S/2", "MDTv2-S/2"))
    assert max(value for name, value in checks.items() if "vs" in name) < 1e-5
    table = (tmp_path / "out" / "protocol.md").read_text()
    assert "| masked training step | bf16 | EDT-S/2 |" in table and "3.93x" in table
    assert json.loads((tmp_path / "out" / "protocol.json").read_text())["rows"][0]["ratio"] == result["rows"][0]["ratio"]


@pytest.mark.parametrize("kernel", ["flex", "triton"])
def test_gpu_protocol_measures_inference_through_another_attention_kernel_when_asked(tmp_path, monkeypatch, kernel):
    calls = []
    call_name = f"{kernel}_inference_attention"
    kernel_call = getattr(models.attention, call_name)
    monkeypatch.setattr(models.attention, call_name, lambda *args: calls.append(1) or kernel_call(*args))
    result = gpu_protocol.main(["--out", str(tmp_path), "--tiny", "--device", "cpu", "--attention-kernel", kernel,
                                "--measurements", "inference", "--precisions", "fp32", "--warmup", "0",
                                "--repeats", "1"])
    assert [row["other"] for row in result["rows"]] == ["MDTv2-S/2", "DiT-S/2"] and calls
    assert max(value for name, value in result["checks"].items() if "vs plain, inference" in name) < 1e-5
    assert f"attention at inference: {kernel}" in (tmp_path / "protocol.md").read_text()
    assert models.attention_kernels.inference_kernel is None  # turned off again


def test_gpu_protocol_trains_with_flat_adan_when_asked(tmp_path, monkeypatch):
    stepped = []

    def counted_update(*args):
        stepped.append(1)
        return flat_adan.adan_update_(*args)
    # Its update eager: the protocol's use of it is tested here, its compilation in test_flat_adan.py.
    monkeypatch.setattr(flat_adan, "compiled_adan_update_", lambda: counted_update)
    monkeypatch.setattr(gpu_protocol, "correctness_checks", lambda args, device: {})  # tested above
    result = gpu_protocol.main(["--out", str(tmp_path), "--tiny", "--device", "cpu", "--flat-adan",
                                "--measurements", "train_masked", "--precisions", "bf16", "--warmup", "0",
                                "--repeats", "1"])
    assert [row["other"] for row in result["rows"]] == ["MDTv2-S/2"] and len(stepped) >= 4  # both models, twice
    assert "optimizer: FlatAdan" in (tmp_path / "protocol.md").read_text()


def test_gpu_protocol_stopped_midway_keeps_the_rows_it_measured(tmp_path, monkeypatch):
    measure_pair = gpu_protocol.measure_pair

    def stopped_at_the_second(comparison, *args):
        if comparison.other != "MDTv2-S/2":
            raise KeyboardInterrupt  # as a time limit would stop it
        return measure_pair(comparison, *args)
    monkeypatch.setattr(gpu_protocol, "measure_pair", stopped_at_the_second)
    monkeypatch.setattr(gpu_protocol, "correctness_checks", lambda args, device: {})  # tested above
    with pytest.raises(KeyboardInterrupt):
        gpu_protocol.main(["--out", str(tmp_path), "--tiny", "--device", "cpu", "--measurements", "inference",
                           "--precisions", "fp32", "--warmup", "0", "--repeats", "1"])
    table = (tmp_path / "protocol.md").read_text()
    assert "| inference | fp32 | EDT-S/2 |" in table and "Cut off after 1 of 2 rows." in table
    assert len(json.loads((tmp_path / "protocol.json").read_text())["rows"]) == 1


def test_gpu_protocol_refuses_a_folder_without_the_release_model(tmp_path):
    with pytest.raises(SystemExit, match="has no models_edt.py"):
        gpu_protocol.parse_args(["--out", str(tmp_path), "--release-code", str(tmp_path)])


def test_gpu_profile_tiny_on_cpu_splits_each_case_by_category_and_part(tmp_path):
    out = tmp_path / "profile"
    result = gpu_profile.main(["--out", str(out), "--tiny", "--device", "cpu", "--warmup", "0", "--repeats", "1",
                               "--steps", "1"])
    rows = {row["case"]: row for row in result["rows"]}
    assert set(rows) == {f"{model} {name}" for model in ("EDT-S/2", "MDTv2-S/2")
                         for name in ("inference", "masked training step")}
    for row in rows.values():
        assert row["wall_ms"] > 0 and row["launches"] > 0
        assert sum(row["category_ms"].values()) == pytest.approx(row["kernel_ms"])
        assert sum(row["part_ms"].values()) == pytest.approx(row["kernel_ms"])
        assert row["category_ms"]["matmul"] > 0 and row["category_ms"]["attention"] > 0
    edt_inference, edt_step = rows["EDT-S/2 inference"], rows["EDT-S/2 masked training step"]
    assert {"forward: blocks, stage 0", "forward: blocks, stage 3 (AMM)", "forward: down_blocks"} <= set(
        edt_inference["part_ms"])
    assert {"backward", "optimizer", "EMA", "forward: blocks, stage 0"} <= set(edt_step["part_ms"])
    assert "(AMM)" not in " ".join(edt_step["part_ms"])  # training runs without the AMM
    assert edt_step["category_ms"]["optimizer"] > 0
    stem = "EDT_S_2_masked_training_step"
    with gzip.open(out / "traces" / f"{stem}.json.gz") as trace:
        assert json.load(trace)["traceEvents"]
    assert "aten::" in (out / "tables" / f"{stem}.txt").read_text()
    assert "| EDT-S/2 masked training step |" in (out / "profile.md").read_text()


def test_launch_count_dispatches_as_on_cuda_and_counts_no_weight_casts(tmp_path):
    result = launch_count.main(["--out", str(tmp_path), "--models", "EDT-S/2", "--batch", "1", "--latent-size", "16"])
    rows = {row["precision"]: row for row in result["rows"]}
    linears = sum(isinstance(module, torch.nn.Linear) for module in create_model("EDT-S/2", input_size=16).modules())
    assert rows["no"]["inference_casts"] == 1  # the timesteps to float
    # Under CUDA's autocast the kept weights leave only activations to cast, fewer than the Linears.
    assert 0 < rows["bf16"]["inference_casts"] < linears
    assert rows["bf16"]["training_casts"] > 2 * linears  # autograd: each weight and its gradient cast
    assert rows["no"]["training_step"] > 3 * rows["no"]["inference"] > 0
    # The optimizer and the EMA launch a few multi-tensor operators; the rest is what CUDA graphs replay.
    assert rows["bf16"]["training_step"] - 50 < rows["bf16"]["training_forward_backward"] < rows["bf16"]["training_step"]
    assert "| EDT-S/2 | bf16 |" in (tmp_path / "launches.md").read_text()


def test_gpu_floor_counts_what_in_place_operators_write():
    states, grads = [torch.ones(1000), torch.ones(10)], [torch.ones(1000), torch.ones(10)]
    with gpu_floor.counting_traffic() as counter:
        torch._foreach_add_(states, grads)  # returns nothing
        states[0].mul_(2)
    assert [(name, moved) for name, moved, _, _ in counter.operators] == [("_foreach_add_", 3 * 1010 * 4),
                                                                           ("mul_", 2 * 1000 * 4)]


def test_gpu_floor_counts_the_models_flops_and_bounds_their_time(tmp_path):
    protocol = tmp_path / "protocol.json"
    protocol.write_text(json.dumps({"matmul_tflops": 100.0, "rows": [
        {"measurement": "inference", "precision": "fp32", "summaries": {"EDT-S/2": {"median_s": 0.5}}},
        {"measurement": "inference", "precision": "fp32", "summaries": {"EDT-S/2": {"median_s": 0.4}}},
        {"measurement": "train_masked", "precision": "bf16", "summaries": {"EDT-S/2": {"median_s": 0.9}}}]}))
    result = gpu_floor.main(["--out", str(tmp_path), "--models", "EDT-S/2", "--batch", "2", "--training-batch", "2",
                             "--latent-size", "16", "--measured", str(protocol)])
    rows = {row["precision"]: row for row in result["rows"] if row["measurement"] == "inference"}
    steps = {row["precision"]: row for row in result["rows"] if row["measurement"] == "train_masked"}
    macs = count_macs(create_model("EDT-S/2", input_size=16))
    # Forward and backward (twice the forward's FLOPs) of the full pass, and of the smaller masked one.
    assert 3 * rows["fp32"]["gflops"] < steps["fp32"]["gflops"] < 6 * rows["fp32"]["gflops"]
    assert steps["bf16"]["launches"] == sum(launch_count.training_step_launches("EDT-S/2", "bf16", 2, 16)[0].values())
    assert steps["bf16"]["by_category"]["optimizer"]["floor_ms"] > 0
    assert steps["bf16"]["measured_ms"] == pytest.approx(900) and steps["fp32"]["measured_ms"] is None
    assert rows["fp32"]["gflops"] * 1e9 == pytest.approx(2 * macs * 2, rel=1e-9)
    assert rows["bf16"]["gflops"] > rows["fp32"]["gflops"]  # q, k and v padded from 52 to 56 channels
    assert rows["bf16"]["gigabytes"] < 0.8 * rows["fp32"]["gigabytes"]
    assert rows["bf16"]["launches"] == sum(launch_count.inference_launches("EDT-S/2", "bf16", 2, 16).values())
    rates = result["rates"]
    assert rates["matmul_flops"] == 100e12
    for row in result["rows"]:
        assert row["floor_ms"] == pytest.approx(sum(entry["floor_ms"] for entry in row["by_category"].values()))
        assert row["floor_ms"] * 1e-3 >= row["gigabytes"] * 1e9 / rates["bandwidth"]
        assert row["floor_ms"] * 1e-3 >= row["gflops"] * 1e9 / rates["matmul_flops"]
        assert 0 < row["matmul_rate_at_floor"] <= 1
    assert rows["fp32"]["measured_ms"] == pytest.approx(400) and rows["bf16"]["measured_ms"] is None
    report = (tmp_path / "floor.md").read_text()
    assert "| inference | EDT-S/2 | fp32 |" in report and "| train_masked | EDT-S/2 | bf16 |" in report
    with pytest.raises(SystemExit, match="cannot read a protocol.json"):
        gpu_floor.main(["--out", str(tmp_path), "--measured", str(tmp_path / "missing.json")])


FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for python3: records each benchmark's arguments and writes the report it would.
if [ "$1" = "-c" ]; then exit "${HAS_DIFFUSERS:-0}"; fi
if [ "$2" = "pip" ]; then exit 1; fi  # no wheels to install
echo "$*" >> "$CALLS"
out="$(echo "$*" | sed -E 's/.*--out ([^ ]+).*/\\1/')"
mkdir -p "$out/traces" && touch "$out/traces/case.json.gz"
case "$2" in
  benchmarks.gpu_profile) echo profile > "$out/profile.md" ;;
  benchmarks.attention_kernels) echo attention > "$out/attention_kernels.md" ;;
  *) echo protocol > "$out/protocol.md" ;;
esac
"""


def run_gpu_session(tmp_path, *args, has_diffusers=True):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python3").write_text(FAKE_PYTHON)
    (bin_dir / "python3").chmod(0o755)
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PATH=f"{bin_dir}:/usr/bin:/bin", CALLS=str(tmp_path / "calls"),
               HAS_DIFFUSERS="0" if has_diffusers else "1", GPU_SESSION_ARGS="--tiny --device cpu")
    return subprocess.run(["bash", os.path.join(repo_root, "benchmarks", "gpu_session.sh"), *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True)


def test_gpu_session_runs_each_benchmark_in_turn_and_brings_back_eight_files(tmp_path):
    out = tmp_path / "out"
    assert run_gpu_session(tmp_path, str(out), "release_checkout").returncode == 0
    calls = (tmp_path / "calls").read_text().splitlines()
    assert [call.split()[1] for call in calls] == ["benchmarks.gpu_protocol"] * 4 + ["benchmarks.gpu_profile",
                                                                                    "benchmarks.attention_kernels"]
    assert "--release-code release_checkout" in calls[0] and "--cuda-graphs" not in calls[0]  # no GPU here
    assert "--flat-adan" in calls[1] and "--release-code" not in calls[1]
    assert "--attention-kernel triton" in calls[2] and "--attention-kernel flex" in calls[3]
    assert "--only EDT-S/2" in calls[5] and all(call.endswith("--tiny --device cpu") for call in calls)
    assert sorted(os.listdir(out)) == ["attention_kernels.md", "profile.md", "protocol.md", "protocol_flat_adan.md",
                                       "protocol_flex.md", "protocol_triton.md", "session.log", "session.tar.gz"]
    assert (out / "profile.md").read_text() == "profile\n"
    with tarfile.open(out / "session.tar.gz") as archive:
        names = archive.getnames()
    assert "./protocol/protocol.md" in names and not any("traces" in name for name in names)
    assert "== profile: exit 0" in (out / "session.log").read_text()
    missing = run_gpu_session(tmp_path, str(tmp_path / "other"), has_diffusers=False)
    assert missing.returncode == 1 and "holds no wheels for it" in missing.stdout


def test_compare_trees_loads_the_other_checkouts_models_beside_ours():
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    lines = compare_trees.main(["--baseline", repo_root, "--model", "EDT-S/2", "--measurements", "inference",
                                "--latent-size", "16", "--batch-size", "1", "--device", "cpu", "--repeats", "1",
                                "--warmup", "0"])
    assert len(lines) == 1 and lines[0].startswith("EDT-S/2 inference (no, batch 1): baseline ")
    assert compare_trees.BASELINE_PACKAGE in sys.modules
    with pytest.raises(SystemExit, match="no models package"):
        compare_trees.main(["--baseline", os.path.join(repo_root, "tests")])


def test_attention_kernel_benchmark_checks_every_candidate_and_marks_the_choice(tmp_path):
    rows = attention_kernels.main(["--device", "cpu", "--tiny", "--repeats", "1", "--out", str(tmp_path)])
    for case in {row["case"] for row in rows}:
        case_rows = [row for row in rows if row["case"] == case]
        assert sum(row["chosen"] for row in case_rows) == 1
        assert {"explicit"} < {row["candidate"] for row in case_rows}
        assert all(row["relative_error"] < 1e-5 and row["ms"] > 0 for row in case_rows)
    inference = {"EDT-S/2 tiny, inference", "EDT-S/2 tiny AMM, inference", "DiT tiny, inference"}
    assert {row["case"] for row in rows if "flex" in row["candidate"]} == inference  # no CPU backward
    triton = [row for row in rows if "triton" in row["candidate"]]  # inference only; under the interpreter here
    assert {row["case"] for row in triton} == inference and "triton, one pass (64 x 64" in triton[1]["candidate"]
    assert not any(row["chosen"] or "cudnn" in row["candidate"] for row in rows if "flex" in row["candidate"])
    assert (tmp_path / "attention_kernels.md").read_text().count("| yes |") == len({row["case"] for row in rows})
    amm_only = attention_kernels.main(["--device", "cpu", "--tiny", "--repeats", "1", "--only", "AMM"])
    assert {row["case"] for row in amm_only} == {"EDT-S/2 tiny AMM, inference"}
