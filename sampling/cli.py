"""Command-line options shared by the two sampling scripts."""
from models.attention import AMM_VARIANTS
from models.attention_kernels import INFERENCE_KERNELS, inference_kernel_unavailable
from runtime.vae import PIXELS, VAE_NAMES

from .loading import AMM_PRESET
from .sampler import PRECISIONS, SAMPLERS, Sampler

CFG_CHANNELS = {"3": 3, "all": None}  # guided output channels: the faithful 3, or all
DEFAULT_KERNEL = "default"  # models.attention_kernels.choose_attention_kernel's choice
ATTENTION_KERNELS = (DEFAULT_KERNEL, *INFERENCE_KERNELS)  # --attention-kernel, here and in benchmarks.gpu_protocol


def add_model_arguments(parser, default_model=None):
    parser.add_argument("--ckpt", required=True, help="a released checkpoint or one of train_mask_adan.py")
    parser.add_argument("--model", default=None,
                        help="model name, e.g. EDT-S/2 or DiT-XL/2; optional when the checkpoint "
                             "records its model" + (f" (default {default_model})" if default_model else ""))
    parser.add_argument("--ckpt-key", choices=("ema", "model"), default="ema",
                        help="which weights of a training checkpoint")
    parser.add_argument("--image-size", type=int, default=None,
                        help="default: the checkpoint's, else 256")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="default: the checkpoint's, else 1000")
    parser.add_argument("--vae", default=None,
                        help=f"default: the checkpoint's, else {VAE_NAMES[0]}; {' or '.join(VAE_NAMES)} are the "
                             f"SD VAEs, '{PIXELS}' for pixel-space models")
    parser.add_argument("--vae-path", default=None,
                        help="local AutoencoderKL folder (default: where the checkpoint's features VAE was, "
                             "else ./sd-vae-ft-{vae}); it must be the VAE the model was trained on")
    amm = parser.add_mutually_exclusive_group()
    amm.add_argument("--amm", dest="amm", action="store_const", const=AMM_PRESET,
                     help="AMM in the model's default blocks (without these three flags the "
                          "model's own setting: on for EDT-*/2, off for *_noAMM and DiT)")
    amm.add_argument("--no-amm", dest="amm", action="store_const", const=[], help="no AMM block")
    amm.add_argument("--amm-blocks", dest="amm", type=int, nargs="+", metavar="INDEX",
                     help="AMM in exactly these blocks (flat indices)")
    parser.add_argument("--amm-variant", choices=AMM_VARIANTS, default=None,
                        help="the AMM function: 256, exp(cos(f d)) / 2, or 512, 1.3 cos(f d); default: "
                             "the model's, as released: 512 for EDT at 512x512 (latent 64), else 256")


def add_sampling_arguments(parser, cfg_scale):
    parser.add_argument("--cfg-scale", type=float, default=None, nargs="+",
                        help=f"classifier-free guidance, one or more scales sampled in turn from the same noise "
                             f"(default {cfg_scale:g}; unconditional models: 1 only)")
    parser.add_argument("--cfg-channels", choices=tuple(CFG_CHANNELS), default="3",
                        help="guide the first 3 output channels (as released) or all")
    parser.add_argument("--sampler", default="ddpm", metavar="{" + ",".join(SAMPLERS) + "}",
                        help="ddpm and ddim (eta = 0): respaced, as released; the others: "
                             "diffusers' solvers on EDT's schedule")
    parser.add_argument("--num-sampling-steps", type=int, default=250)
    parser.add_argument("--mixed-precision", choices=tuple(PRECISIONS), default="no",
                        help="autocast the model in fp16 or bf16")
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    parser.add_argument("--attention-kernel", choices=ATTENTION_KERNELS, default=DEFAULT_KERNEL,
                        help="attention through our one-pass Triton kernel (the AMM in the same pass) or "
                             "FlexAttention instead of the default choice; the same samples up to rounding")


def make_sampler(args):
    """The Sampler the arguments ask for; SystemExit with one line for an unknown sampler or a
    step count it cannot take."""
    if args.sampler not in SAMPLERS:
        raise SystemExit(f"error: --sampler {args.sampler}: unknown; choose from {', '.join(SAMPLERS)}")
    if args.num_sampling_steps < 1:
        raise SystemExit("error: --num-sampling-steps must be at least 1")
    check_cfg_scales(args.cfg_scale or [], "--cfg-scale")
    try:
        return Sampler(args.sampler, args.num_sampling_steps)
    except ValueError as error:
        raise SystemExit(f"error: --num-sampling-steps {args.num_sampling_steps}: {error}")


def check_cfg_scales(scales, flag):
    """SystemExit with one line for a guidance scale below 1 or one listed twice."""
    if any(scale < 1.0 for scale in scales):
        raise SystemExit(f"error: {flag} must be at least 1")
    if len(set(scales)) < len(scales):
        raise SystemExit(f"error: {flag} lists a scale twice: {' '.join(f'{scale:g}' for scale in scales)}")


def inference_attention_kernel(args, device_type):
    """The --attention-kernel for `attention_kernel_at_inference`: None for the default; SystemExit
    with one line where it cannot run on device_type."""
    if args.attention_kernel == DEFAULT_KERNEL:
        return None
    reason = inference_kernel_unavailable(args.attention_kernel, device_type)
    if reason:
        raise SystemExit(f"error: --attention-kernel {args.attention_kernel}: {reason}")
    return args.attention_kernel


def loader_kwargs(args):
    """load_sampling_model's arguments from the parsed options."""
    return dict(ckpt=args.ckpt, model_name=args.model, image_size=args.image_size,
                num_classes=args.num_classes, vae_name=args.vae, vae_path=args.vae_path,
                ckpt_key=args.ckpt_key, amm=args.amm, amm_variant=args.amm_variant, compile_model=args.compile)
