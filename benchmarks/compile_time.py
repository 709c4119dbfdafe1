"""How long torch.compile takes before the first inference call: the model's blocks compiled in
place (`compile_blocks`, what --compile does) against the whole model, each in a fresh process
with an empty Inductor cache.

    python -m benchmarks.compile_time --models EDT-S/2 EDT-XL/2 --device cuda
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models  # noqa: E402

MODES = ("blocks", "whole")


def first_call_seconds(name, mode, device, latent_size):
    """Seconds from compiling to the end of the first forward (batch 1, eval mode)."""
    model = models.create_model(name, input_size=latent_size).to(device).eval()
    x = torch.randn(1, model.in_channels, latent_size, latent_size, device=device)
    t, y = torch.tensor([500], device=device), torch.tensor([1], device=device)
    with torch.no_grad():
        start = time.perf_counter()
        forward = model.compile_blocks() if mode == "blocks" else torch.compile(model)
        forward(x, t, y)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure_in_fresh_process(name, mode, args):
    with tempfile.TemporaryDirectory() as cache:
        command = [sys.executable, "-m", "benchmarks.compile_time", "--models", name, "--device", args.device,
                   "--latent-size", str(args.latent_size), "--one", mode]
        result = subprocess.run(command, capture_output=True, text=True, check=True,
                                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache})
    return float(result.stdout.split()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["EDT-S/2"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--latent-size", type=int, default=32)
    parser.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)  # the child's measurement
    args = parser.parse_args(argv)
    if args.one:
        print(first_call_seconds(args.models[0], args.one, torch.device(args.device), args.latent_size))
        return None
    results = {}
    for name in args.models:
        results[name] = {mode: measure_in_fresh_process(name, mode, args) for mode in MODES}
        print(f"{name}: blocks {results[name]['blocks']:.1f} s, whole model {results[name]['whole']:.1f} s",
              flush=True)
    return results


if __name__ == "__main__":
    main()
