"""FID during training: the EMA model's samples scored with ADM's Inception graph (torch backend).

Every --eval-every steps, --eval-images images are sampled at each --eval-cfg-scale in turn
with the sampling scripts' own functions: image i's class and noise come from (--global-seed,
i), and every sampling and Inception batch is filled to --eval-batch-size rows, so the images,
their features and the FID do not depend on the number of processes. The images are split over
all processes and scored on the training device; the main process gathers their pool_3
features, logs `fid` and `inception_score` to log.txt and TensorBoard, and appends them to
checkpoints/fid_history.json, which a resumed run continues. With several guidance scales, each
scale's scalars carry it in their names (`fid_cfg1.5`). A failed evaluation is logged and
training goes on.
"""
import math
import os
import time

import numpy as np
import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from evaluations import metrics
from evaluations.inception import POOL_DIM, SPATIAL_DIM, InceptionGraphNotFound, find_inception_graph
from evaluations.npz_batches import ImageBatchFile, NpzFormatError, read_precomputed_statistics
from evaluations.torch_inception import TorchInception
from models.kept_tensor import forget_kept_tensors
from runtime import vae as vae_lib
from runtime.cli import require_at_least
from runtime.distributed import split_range
from runtime.io import read_json, write_json
from sampling.cli import check_cfg_scales
from sampling.loading import sampled_shape
from sampling.sampler import SAMPLERS, Sampler, guided_model_fn, sample_images

from .config import ConfigError

HISTORY_NAME = "fid_history.json"
EVALUATION_OPTIONS = ("eval_reference", "eval_images", "eval_sampler", "eval_sampling_steps", "eval_cfg_scale",
                      "eval_batch_size", "inception_graph", "vae_path")
MIN_EVAL_IMAGES = 2  # a covariance needs two feature vectors


#################################################################################
#                           Options, checked up front                           #
#################################################################################

def add_evaluation_arguments(parser):
    group = parser.add_argument_group("evaluation (FID of the EMA model during training)")
    group.add_argument("--eval-every", type=int, default=None, help="evaluate every this many steps (default: never)")
    group.add_argument("--eval-reference", default=None,
                       help="reference batch npz (ADM's, or one of evaluations/reference_batch.py)")
    group.add_argument("--eval-images", type=int, default=10_000, help="images sampled per evaluation")
    group.add_argument("--eval-sampler", default="ddpm", metavar="{" + ",".join(SAMPLERS) + "}",
                       help="a sampler of the sampling scripts")
    group.add_argument("--eval-sampling-steps", type=int, default=250)
    group.add_argument("--eval-cfg-scale", type=float, nargs="+", default=[1.0],
                       help="one or more guidance scales, each evaluated on the same labels and noise")
    group.add_argument("--eval-batch-size", type=int, default=32, help="images per process and batch")
    group.add_argument("--inception-graph", default=None,
                       help="ADM's classify_image_graph_def.pb (default: next to evaluations/evaluator.py, "
                            "then the working directory)")
    group.add_argument("--vae-path", default=None,
                       help="the VAE that decodes the samples (default: where the features' VAE was, else ./sd-vae-ft-{vae})")


def check_evaluation_flags(parser, args):
    """SystemExit with one line for evaluation options that do not go together."""
    require_at_least(args, 1, "eval_every", "eval_batch_size")
    require_at_least(args, MIN_EVAL_IMAGES, "eval_images")
    if args.eval_every is None:
        given = [name for name in EVALUATION_OPTIONS if getattr(args, name) != parser.get_default(name)]
        if given:
            raise SystemExit(f"error: --{given[0].replace('_', '-')} needs --eval-every")
    elif args.eval_reference is None:
        raise SystemExit("error: --eval-every needs --eval-reference REF.npz")
    else:
        check_cfg_scales(args.eval_cfg_scale, "--eval-cfg-scale")


def check_evaluation_inputs(args):
    """ConfigError, before any work, for an evaluation whose graph, reference or sampler cannot work."""
    if args.eval_every is None:
        return
    try:
        find_inception_graph(args.inception_graph)
        reference_pool_statistics_source(args.eval_reference)
        evaluation_sampler(args)
    except (InceptionGraphNotFound, NpzFormatError, ValueError) as error:
        raise ConfigError(str(error)) from None


def evaluation_sampler(args):
    try:
        return Sampler(args.eval_sampler, args.eval_sampling_steps)
    except ValueError as error:
        raise ValueError(f"--eval-sampler {args.eval_sampler} --eval-sampling-steps "
                         f"{args.eval_sampling_steps}: {error}") from None


def reference_pool_statistics_source(path):
    """The reference's precomputed pool_3 statistics, or its images to compute them from."""
    images = ImageBatchFile(path, min_images=MIN_EVAL_IMAGES)  # first: is it an npz of images at all
    precomputed = read_precomputed_statistics(path, POOL_DIM, SPATIAL_DIM)
    return images if precomputed is None else precomputed[0]


#################################################################################
#                                    History                                    #
#################################################################################

class EvaluationHistory:
    """checkpoints/fid_history.json: one entry per evaluation. A resumed run keeps the entries up
    to its checkpoint's step (later ones came from a run it replaces, as TensorBoard's purge)."""

    def __init__(self, path, resumed_step):
        self.path = path
        entries = read_json(path)["evaluations"] if os.path.isfile(path) else []
        self.entries = [entry for entry in entries if entry["step"] <= resumed_step]

    def append(self, entry):
        self.entries.append(entry)
        write_json(self.path, {"evaluations": self.entries})


#################################################################################
#                                   Evaluator                                   #
#################################################################################

def full_batch_features(inception, images, batch_size):
    """pool_3 features (B, 2048) of images (B <= batch_size), run as a full batch with copies of
    the last image, so every network call has the same rows on any number of processes."""
    filler = np.repeat(images[-1:], batch_size - len(images), axis=0)
    return inception.features(np.concatenate([images, filler]))[0][:len(images)]


def empty_features():
    """The features of a process with no image to score (more processes than images)."""
    return np.empty((0, POOL_DIM), np.float32)


def features_in_index_order(parts):
    """pool_3 features (N, 2048) from every process's (indices, features), sorted by index."""
    indices = np.concatenate([np.asarray(part_indices, dtype=np.int64) for part_indices, _ in parts])
    features = np.concatenate([part_features for _, part_features in parts])
    return features[np.argsort(indices, kind="stable")]


class TrainingEvaluator:
    """Samples and scores the EMA model; call it with the TrainState on every process."""

    def __init__(self, args, run, config, resumed_step):
        self.run = run
        self.num_images = args.eval_images
        self.batch_size = args.eval_batch_size
        self.seed = args.global_seed
        self.cfg_scales = args.eval_cfg_scale
        self.precision = args.mixed_precision
        self.sampler = evaluation_sampler(args)
        self.settings = {"num_images": args.eval_images, "sampler": args.eval_sampler,
                         "sampling_steps": args.eval_sampling_steps,
                         "reference": os.path.abspath(args.eval_reference)}
        try:
            self.inception = TorchInception(find_inception_graph(args.inception_graph), run.device)
            self.vae = None if config.vae == vae_lib.PIXELS else vae_lib.load_recorded_vae(
                config.vae, args.vae_path, config.vae_path, run.device, config.latent_norm, config.vae_weights_sha256)
        except (ValueError, vae_lib.VAENotFoundError) as error:
            raise ConfigError(str(error)) from None
        self.latent_shape = sampled_shape(self.vae, config.image_size)
        self.reference = self.reference_statistics(args.eval_reference)
        self.history = (EvaluationHistory(os.path.join(run.checkpoint_dir, HISTORY_NAME), resumed_step)
                        if run.is_main else None)

    def reference_statistics(self, path):
        """pool_3 statistics of the reference (main process; None elsewhere): precomputed, or
        from its images, split over the processes."""
        source = reference_pool_statistics_source(path)
        if isinstance(source, metrics.FeatureStatistics):
            return source
        mine = split_range(source.num_images, self.run.rank, self.run.world_size)
        batches = tqdm(source.batches(self.batch_size, mine.start, mine.stop), desc="reference features",
                       total=math.ceil(len(mine) / self.batch_size), disable=not self.run.is_main)
        features = [full_batch_features(self.inception, images, self.batch_size) for images in batches]
        parts = gather_object([(list(mine), np.concatenate(features) if features else empty_features())])
        return metrics.feature_statistics(features_in_index_order(parts)) if self.run.is_main else None

    def sample_features(self, ema, indices, cfg_scale):
        """pool_3 features (len(indices), 2048) of the EMA model's samples `indices`."""
        model_fn = guided_model_fn(ema, cfg_scale, precision=self.precision)
        sample = self.sampler.sample_fn(model_fn, self.latent_shape, self.run.device, next(ema.parameters()).dtype)
        batches = sample_images(sample, self.vae, self.seed, indices, self.batch_size, ema.y_embedder.num_classes,
                                progress=self.run.is_main, fill_batches=True)
        features = [full_batch_features(self.inception, images, self.batch_size) for _, images in batches]
        return np.concatenate(features) if features else empty_features()

    def local_part(self, ema, cfg_scale):
        """(indices, features, error) of this process. Sampling draws only from per-image
        generators, but the global generators are restored anyway, so that a resumed run stays
        bit-exact whether or not it evaluated; the EMA model samples in eval mode (no label
        dropout, AMM on), and what it kept for inference is freed for the training steps."""
        indices = list(split_range(self.num_images, self.run.rank, self.run.world_size))
        cuda = [self.run.device] if self.run.device.type == "cuda" else []
        was_training = ema.training
        try:
            with torch.random.fork_rng(devices=cuda):
                ema.eval()
                return indices, self.sample_features(ema, indices, cfg_scale), None
        except Exception as error:  # a failed evaluation must not end the training run
            return indices, None, f"process {self.run.rank}: {type(error).__name__}: {error}"
        finally:
            ema.train(was_training)
            forget_kept_tensors(ema)

    def __call__(self, state):
        """Evaluates at state.step, each guidance scale in turn; every process must call it (it
        gathers features)."""
        for cfg_scale in self.cfg_scales:
            self.evaluate(state, cfg_scale)

    def evaluate(self, state, cfg_scale):
        start = time.perf_counter()
        parts = gather_object([self.local_part(state.ema, cfg_scale)])
        if not self.run.is_main:
            return
        failed = f"(step={state.step:07d}) evaluation at cfg {cfg_scale:g} failed, training goes on: "
        errors = [error for _, _, error in parts if error is not None]
        if errors:
            self.run.logger.warning(failed + errors[0])
            return
        try:
            self.report(state.step, cfg_scale,
                        features_in_index_order([(indices, features) for indices, features, _ in parts]),
                        time.perf_counter() - start)
        except Exception as error:  # e.g. a full disk for the history: the run goes on
            self.run.logger.warning(failed + f"{type(error).__name__}: {error}")

    def scalar_name(self, name, cfg_scale):
        """TensorBoard's name of a metric: with several scales, each scale's has it in the name."""
        return f"eval/{name}" if len(self.cfg_scales) == 1 else f"eval/{name}_cfg{cfg_scale:g}"

    def report(self, step, cfg_scale, features, seconds):
        fid = metrics.statistics_distance(metrics.feature_statistics(features), self.reference)
        inception_score = metrics.inception_score(features, self.inception.logit_weights)
        self.run.logger.info(f"(step={step:07d}) fid {fid:.4f}, inception score {inception_score:.3f} "
                             f"({self.num_images} images, {self.settings['sampler']} "
                             f"{self.settings['sampling_steps']} steps, cfg {cfg_scale:g}, {seconds:.1f} s)")
        if self.run.writer is not None:
            self.run.writer.add_scalar(self.scalar_name("fid", cfg_scale), fid, step)
            self.run.writer.add_scalar(self.scalar_name("inception_score", cfg_scale), inception_score, step)
        self.history.append({"step": step, "fid": fid, "inception_score": inception_score,
                             "seconds": seconds, **self.settings, "cfg_scale": cfg_scale})


def build_evaluator(args, run, config, resumed_step):
    """The TrainingEvaluator the options ask for, or None without --eval-every."""
    if args.eval_every is None:
        return None
    return TrainingEvaluator(args, run, config, resumed_step)
