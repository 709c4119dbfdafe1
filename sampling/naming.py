"""Names of sample folders and grid files: every setting that changes the samples is in the
name, so runs with different settings (AMM on or off, step counts, ...) never share a folder."""
import os

from models.attention import DEFAULT_AMM_VARIANT


def model_tag(model_name):
    return model_name.replace("/", "-")


def checkpoint_tag(ckpt):
    return os.path.splitext(os.path.basename(ckpt))[0]


def amm_tag(amm_blocks, variant=DEFAULT_AMM_VARIANT):
    """"amm7.10" for AMM in blocks 7 and 10, "amm10-v512" for the 512 AMM function in block
    10, "noamm" without."""
    if not amm_blocks:
        return "noamm"
    blocks = "amm" + ".".join(str(index) for index in amm_blocks)
    return blocks if variant == DEFAULT_AMM_VARIANT else f"{blocks}-v{variant}"


def comparison_tag(amm_blocks, variant=DEFAULT_AMM_VARIANT):
    """"amm7.10-vs-noamm": a with- and without-AMM comparison."""
    return f"{amm_tag(amm_blocks, variant)}-vs-{amm_tag([])}"


def sample_name(model_name, ckpt, image_size, vae, cfg_scale, sampler, num_steps, amm,
                seed, cfg_channels=3, precision="no", balanced_images=None, classes=None):
    """E.g. "EDT-S-2-0400000-size-256-vae-ema-cfg-1.0-ddpm250-amm7.10-seed-0"; `amm` is
    `amm_tag(blocks)` or a `comparison_tag`.

    Settings off their defaults are appended: guidance on all channels ("-guide-all"),
    autocast ("-amp-bf16"), class-balanced labels over N images ("-balanced-N": the labels of
    a balanced run depend on N), a subset of the classes ("-classes-3.7").
    """
    parts = [model_tag(model_name), checkpoint_tag(ckpt), f"size-{image_size}", f"vae-{vae}",
             f"cfg-{float(cfg_scale)}", f"{sampler}{num_steps}", amm, f"seed-{seed}"]
    if cfg_scale != 1.0 and cfg_channels is None:
        parts.append("guide-all")
    if precision != "no":
        parts.append(f"amp-{precision}")
    if balanced_images is not None:
        parts.append(f"balanced-{balanced_images}")
    if classes is not None:
        parts.append("classes-" + ".".join(map(str, classes)))
    return "-".join(parts)
