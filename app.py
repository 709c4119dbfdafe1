"""A local web demo of a checkpoint: samples of a class with and without AMM, side by side.

    python app.py                               # the quickstart's checkpoint, http://127.0.0.1:7860
    python app.py --ckpt EDT-XL-2.pt --vae-path sd-vae-ft-ema --class-names imagenet_classes.txt

Offline: no analytics, no share link, fonts served by the app itself, on 127.0.0.1 only.
"""
import argparse
import os

import torch

from demo.generation import MAKE_CHECKPOINT, CheckpointCache, DemoInputError, quickstart_checkpoint
from demo.page import build_page
from runtime.cli import require_at_least
from sampling.labels import read_class_names

HOST = "127.0.0.1"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", default=None,
                        help="a checkpoint of train_mask_adan.py or a released one that records its model "
                             "(default: the newest under ./quickstart_output)")
    parser.add_argument("--vae-path", default=None, help="local VAE folder (default ./sd-vae-ft-{vae})")
    parser.add_argument("--class-names", default=None,
                        help="a text file naming class k on line k (e.g. ImageNet's 1000) or an id2label "
                             "JSON; default: the names the checkpoint records, else indices")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--max-images", type=int, default=16, help="the most images one request may ask for")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    require_at_least(args, 1, "port", "max_images", "batch_size")
    if args.ckpt is None:
        args.ckpt = quickstart_checkpoint()
        if args.ckpt is None:
            raise SystemExit(f"error: no --ckpt and no quickstart checkpoint under ./quickstart_output; "
                             f"make one with: {MAKE_CHECKPOINT}")
    if args.class_names is not None and not os.path.isfile(args.class_names):
        raise SystemExit(f"error: no class-names file {args.class_names}")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        class_names = read_class_names(args.class_names) if args.class_names else None
    except ValueError as error:
        raise SystemExit(f"error: --class-names {error}")
    cache = CheckpointCache(args.vae_path, class_names, device)
    try:
        initial = cache.get(args.ckpt)
    except DemoInputError as error:
        raise SystemExit(f"error: {error}")
    if class_names and initial.class_names != class_names:
        raise SystemExit(f"error: {args.class_names} names {len(class_names)} classes, "
                         f"the model has {len(initial.class_names)}")
    page = build_page(cache, initial, args.max_images, args.batch_size)
    print(f"EDT demo of {args.ckpt} on http://{HOST}:{args.port}", flush=True)
    page.queue().launch(server_name=HOST, server_port=args.port, share=False, ssr_mode=False,
                        mcp_server=False, show_error=True)


if __name__ == "__main__":
    main()
