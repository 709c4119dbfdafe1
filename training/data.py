"""Data order: one permutation per epoch from (seed, epoch), cut into global batches, each
split into disjoint per-process micro-batches. The order is a pure function of (seed, epoch,
step), so a resumed run reads exactly the items the uninterrupted run would have read, and
skipping to the middle of an epoch costs nothing."""
import numpy as np
import torch
from torch.utils.data import DataLoader

from latents import LatentDataset
from runtime.checkpoint import summarise

from .preemption import ignore_preemption_in_worker

ORDER_STREAM = 1  # keeps the order's random stream apart from the dataset's flip table


def epoch_permutation(seed, epoch, num_items):
    return np.random.default_rng([seed, epoch, ORDER_STREAM]).permutation(num_items)


class EpochBatches:
    """The micro-batches of one process. Global batch `step` of an epoch is
    permutation[step * G : (step + 1) * G] with G = world_size * mini_batch * accumulation;
    micro-batch a of process r is its slice starting at (a * world_size + r) * mini_batch.
    The last incomplete global batch of an epoch is dropped, so every process takes the same
    number of steps."""

    def __init__(self, num_items, seed, global_batch_size, mini_batch_size, rank, world_size):
        self.num_items = num_items
        self.seed = seed
        self.global_batch_size = global_batch_size
        self.mini_batch_size = mini_batch_size
        self.rank = rank
        self.world_size = world_size
        self.accumulation_steps = global_batch_size // (mini_batch_size * world_size)

    @property
    def steps_per_epoch(self):
        return self.num_items // self.global_batch_size

    def micro_batches(self, epoch, first_step=0):
        """Index lists of this process, accumulation_steps per step, from `first_step` on."""
        order = epoch_permutation(self.seed, epoch, self.num_items)
        batches = []
        for step in range(first_step, self.steps_per_epoch):
            for micro in range(self.accumulation_steps):
                start = step * self.global_batch_size + (micro * self.world_size + self.rank) * self.mini_batch_size
                batches.append(order[start:start + self.mini_batch_size].tolist())
        return batches


class TrainData:
    """Loads the micro-batches of each step; the dataset's flip table follows the epoch."""

    def __init__(self, dataset, batches, num_workers, device):
        self.dataset = dataset
        self.batches = batches
        self.num_workers = num_workers
        self.device = device

    @property
    def steps_per_epoch(self):
        return self.batches.steps_per_epoch

    def steps(self, epoch, first_step=0):
        """Yields, for each remaining step of `epoch`, its micro-batches [(x, y)] on the device."""
        self.dataset.set_epoch(epoch)  # before the loader copies the dataset into its workers
        loader = DataLoader(self.dataset, batch_sampler=self.batches.micro_batches(epoch, first_step),
                            num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
                            # A private generator: starting a loader must not draw from the
                            # global torch RNG, or a resumed run would diverge.
                            generator=torch.Generator(),
                            worker_init_fn=ignore_preemption_in_worker)
        step_batches = []
        for x, y in loader:
            step_batches.append((x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)))
            if len(step_batches) == self.batches.accumulation_steps:
                yield step_batches
                step_batches = []


def describe_norm(latent_norm):
    return "pixels" if latent_norm is None else latent_norm.describe()


def build_data(args, run):
    dataset = LatentDataset(args.feature_path, seed=args.global_seed, random_flip=not args.no_flip,
                            unconditional=args.unconditional)
    batches = EpochBatches(len(dataset), args.global_seed, args.global_batch_size,
                           run.mini_batch_size, run.rank, run.world_size)
    classes = "unconditional" if args.unconditional else f"{dataset.num_classes} classes {summarise(dataset.class_names)}"
    run.logger.info(f"{len(dataset)} latents of shape {dataset.latent_shape} ({dataset.vae} VAE, "
                    f"{describe_norm(dataset.latent_norm)}), {classes}, {batches.steps_per_epoch} steps per epoch")
    return TrainData(dataset, batches, args.num_workers, run.device)
