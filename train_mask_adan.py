"""Trains EDT with token-masked training and Adan on extracted latents.

    accelerate launch --multi_gpu --num_processes 8 train_mask_adan.py --results-dir results \
        --model EDT-S/2 --feature-path FEATURES --epochs 81
    python train_mask_adan.py ...                       (one process)
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 train_mask_adan.py ...
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:PORT ...
                                                        (several nodes: docs/multinode.md)

A custom size: --model EDT --dims 64 64 64 64 64 --num-heads 2 2 2 2 2 --depths 1 1 1 1 1
--patch-size 1. --model MDTv2-S/2 trains MDT's objective (full-token loss plus the loss of its
masked pass) under the same optimiser and schedule. --no-mask trains without masking (the
released train_adan.py). Checkpoints go to
RESULTS/NNN-MODEL/checkpoints/{step:07d}.pt; --resume latest continues the newest one
bit-exactly, or starts a new run when there is none, so the same command serves the first
launch, torchrun's restarts (--max-restarts) and a requeue. SIGTERM (preemption) saves a
checkpoint at the next step boundary and exits 0. A step whose loss or gradient is not finite
on any process is skipped by all of them; --max-bad-steps in a row stop the run (or, with
--rollback, reload the last checkpoint and go on past them); --grad-clip clips the gradient
norm; loss spikes are logged (training/guard.py). --eval-every K --eval-images N
--eval-reference REF.npz logs the EMA model's FID (and Inception Score) every K steps, from N
images sampled with the sampling scripts' sampler (--eval-sampler, --eval-sampling-steps,
--eval-cfg-scale: one or more scales) and scored by ADM's Inception graph in PyTorch
(training/evaluation.py).
--cuda-graphs (GPU) replays each step's forward and backward from CUDA graphs
(training/graphed_losses.py). --unconditional ignores the labels. Checkpoints record the
features' VAE, latent normalisation and class names, which the sampling scripts, the demo and
the diffusers converter read.
--init-from CKPT fine-tunes a released or earlier model on other classes, image size or VAE:
what fits is loaded, class rows are kept by name (--init-class-names FILE names a released
checkpoint's classes), the rest starts as in a new model (training/initialise.py).
"""
import argparse

from diffusion.timestep_sampler import SCHEDULE_SAMPLERS
from runtime.cli import require_at_least
from training.build import build_training
from training.config import ConfigError, resolve_run_config
from training.data import build_data
from training.evaluation import add_evaluation_arguments, build_evaluator, check_evaluation_flags, check_evaluation_inputs
from training.initialise import add_init_arguments, check_init_flags, check_init_from
from training.loop import train
from training.schedule import default_init_lr
from training.setup import setup_run


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    data = parser.add_argument_group("data")
    data.add_argument("--feature-path", required=True, help="folder written by extract_features.py")
    data.add_argument("--results-dir", default="results")
    data.add_argument("--image-size", type=int, default=None, help="checked against the features")
    data.add_argument("--num-classes", type=int, default=None, help="checked against the features")
    data.add_argument("--vae", default=None,
                      help="checked against the features' VAE name (ema, mse, another, none; recorded in checkpoints)")
    data.add_argument("--unconditional", action="store_true",
                      help="an unconditional model: the labels are ignored (one class, no label dropout)")
    data.add_argument("--num-workers", type=int, default=4)
    data.add_argument("--no-flip", action="store_true",
                      help="never use the stored horizontal flips (for data where a mirror image "
                           "is another class, such as digits)")

    model = parser.add_argument_group("model")
    model.add_argument("--model", default="EDT-S/2",
                       help="a registered name (EDT-S/2, MDTv2-S/2, DiT-XL/2, ...) or EDT / DiT / MDTv2 "
                            "with size options")
    model.add_argument("--dims", type=int, nargs="+", help="EDT: width of each of the 5 stages")
    model.add_argument("--num-heads", type=int, nargs="+", help="EDT: 5 head counts; DiT, MDTv2: one")
    model.add_argument("--depths", type=int, nargs="+", help="EDT: blocks in each of the 5 stages")
    model.add_argument("--hidden-size", type=int, help="DiT / MDTv2 width")
    model.add_argument("--depth", type=int, help="DiT / MDTv2 blocks")
    model.add_argument("--patch-size", type=int, default=None, help="EDT / DiT / MDTv2 (default 2)")
    model.add_argument("--mask-ratio", type=float, default=None,
                       help="MDTv2: masked training drops this + U(0, 0.2) of the tokens (default 0.3)")
    model.add_argument("--decode-layer", type=int, default=None, help="MDTv2: decoder blocks (default 4)")
    model.add_argument("--amm-blocks", nargs="+", default=None,
                       help="AMM block indices, a preset (default, high_cfg) or none")
    model.add_argument("--no-mask", action="store_true", help="plain training, no token masking")
    model.add_argument("--fused-mask-batch", action="store_true",
                       help="run the full and masked passes as one batch of 2B (faster; the same "
                            "in distribution, not bit-identical to the default two passes)")
    model.add_argument("--schedule-sampler", choices=list(SCHEDULE_SAMPLERS), default="loss-second-moment")
    model.add_argument("--exact-decoder-nll", action="store_true",
                       help="the t = 0 loss term with the exact normal CDF, not the released tanh approximation")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=1400)
    optim.add_argument("--max-steps", type=int, default=None, help="stop earlier, after this many steps")
    optim.add_argument("--global-batch-size", type=int, default=256)
    optim.add_argument("--mini-batch-size", type=int, default=None,
                       help="per process and forward pass; smaller than global / processes "
                            "accumulates gradients")
    optim.add_argument("--init-lr", type=float, default=None, help="default 1e-3, 5e-4 for XL models")
    optim.add_argument("--final-lr", type=float, default=5e-5)
    optim.add_argument("--lr-decay-steps", type=int, default=400_000)
    optim.add_argument("--ema-decay", type=float, default=0.9999)
    optim.add_argument("--ema-warmup", action="store_true",
                       help="decay min(ema_decay, (1 + step) / (10 + step)), for short runs")
    optim.add_argument("--global-seed", type=int, default=0)
    optim.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no")
    optim.add_argument("--grad-checkpointing", action="store_true")
    optim.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    optim.add_argument("--cuda-graphs", action="store_true",
                       help="replay each step's forward and backward from CUDA graphs (GPU; EDT, DiT, "
                            "MDTv2 with --no-mask; one micro-batch per step; training/graphed_losses.py)")
    optim.add_argument("--flat-adan", action="store_true",
                       help="Adan's update in one compiled pass over flat buffers: equal to timm's "
                            "up to rounding, same checkpoints (training/flat_adan.py)")
    optim.add_argument("--grad-clip", type=float, default=None, metavar="NORM",
                       help="clip the global gradient norm to NORM (off by default, as released)")

    guard = parser.add_argument_group("bad steps")
    guard.add_argument("--max-bad-steps", type=int, default=3,
                       help="steps with a non-finite loss or gradient are skipped; this many in a row stop the run")
    guard.add_argument("--rollback", action="store_true",
                       help="instead of stopping, reload the last checkpoint and go on past the bad steps")
    guard.add_argument("--loss-spike-factor", type=float, default=3.0,
                       help="log a step whose loss exceeds this many times the running median")
    guard.add_argument("--loss-spike-window", type=int, default=200, help="steps in the running median")

    run = parser.add_argument_group("run")
    run.add_argument("--log-every", type=int, default=100)
    run.add_argument("--ckpt-every", type=int, default=50_000)
    run.add_argument("--resume", default=None,
                     help="a checkpoint file, or 'latest' (the newest of this model, if any)")
    add_init_arguments(parser)
    add_evaluation_arguments(parser)
    args = parser.parse_args(argv)

    require_at_least(args, 1, "epochs", "global_batch_size", "log_every", "ckpt_every", "max_steps", "mini_batch_size",
                     "max_bad_steps", "loss_spike_window")
    if args.grad_clip is not None and args.grad_clip <= 0:
        raise SystemExit("error: --grad-clip must be positive")
    if args.loss_spike_factor <= 1:
        raise SystemExit("error: --loss-spike-factor must be above 1")
    check_evaluation_flags(parser, args)
    if args.unconditional and (args.num_classes is not None or args.eval_cfg_scale != [1.0]):
        raise SystemExit("error: an --unconditional model has one class and no guidance: "
                         "drop --num-classes and --eval-cfg-scale")
    check_init_flags(args)
    if args.fused_mask_batch and args.no_mask:
        raise SystemExit("error: --fused-mask-batch fuses the masked pass; it has no use with --no-mask")
    if args.init_lr is None:
        args.init_lr = default_init_lr(args.model)
    return args


def main(argv=None):
    """Trains; returns the final TrainState (for tests and notebooks)."""
    args = parse_args(argv)
    try:
        config = resolve_run_config(args)
        check_evaluation_inputs(args)
        check_init_from(args, config)
        run = setup_run(args, config)
        state, diffusion = build_training(args, config, run)
    except ConfigError as error:
        raise SystemExit(f"error: {error}")
    data = build_data(args, run)
    try:
        evaluator = build_evaluator(args, run, config, resumed_step=state.step)
    except ConfigError as error:
        raise SystemExit(f"error: {error}")
    train(args, run, state, diffusion, data, evaluator)
    run.close()
    return state


if __name__ == "__main__":
    main()
