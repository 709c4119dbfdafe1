"""Runs image_generator_ddp.py once per sampler in one launch, so that a test checks several
samplers on two processes with a single torchrun:

    torchrun --nproc_per_node=2 tests/sample_with_each.py ddpm,unipc PORT,PORT ARGUMENTS...
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import image_generator_ddp  # noqa: E402


def main(argv):
    samplers, ports, *arguments = argv
    for sampler, port in zip(samplers.split(","), ports.split(","), strict=True):
        # Each run's process group meets at a store of its own (rank 0 hosts it on `port`): a
        # second group on torchrun's store could read the first one's stale addresses, since
        # destroy_process_group resets the group names.
        os.environ.update(MASTER_PORT=port, TORCHELASTIC_USE_AGENT_STORE="False")
        image_generator_ddp.main([*arguments, "--sampler", sampler])


if __name__ == "__main__":
    main(sys.argv[1:])
