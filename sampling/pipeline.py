"""EDT (or DiT, MDTv2) as a diffusers pipeline, like diffusers' DiTPipeline:

    pipe = EDTPipeline.from_pretrained("edt-s-2-pipeline")       # sampling.to_diffusers wrote it
    images = pipe(class_labels=[207, 360], guidance_scale=4.0, num_inference_steps=25, amm=True,
                  generator=image_generators(0, range(2))).images   # PIL images
    images = pipe(class_labels=pipe.get_label_ids(["cat", "dog"])).images   # by the classes' names
    images = pipe(batch_size=4).images                                # an unconditional model

It samples with the scripts' sampling functions (sampling/sampler.py): the same noise, sampler
and steps give image_generator.py's images. Its scheduler chooses the sampler
(sampling/solvers.py: `pipe.scheduler = edt_scheduler("unipc")` switches to UniPC).
"""
import contextlib

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from PIL import Image

from models.diffusers_wrapper import DiffusionTransformer
from runtime.latent_norm import LatentNorm
from runtime.vae import LatentVAE

from .images import decode_to_uint8
from .loading import model_input_shape
from .sampler import Sampler, guided_model_fn

OUTPUT_TYPES = ("pil", "np")
DEFAULT_GUIDANCE_SCALE = 4.0


class EDTPipeline(DiffusionPipeline):
    """transformer: a models.diffusers_wrapper.DiffusionTransformer; vae: the AutoencoderKL, or
    None for a pixel-space model; scheduler: one of `sampling.solvers.edt_scheduler`'s;
    id2label: {class index: "name, other name, ..."} (ImageNet's names, say), or None;
    latent_norm: the record of the runtime.latent_norm.LatentNorm the model was trained with
    (None: the VAE config's scaling_factor and shift_factor)."""

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]

    def __init__(self, transformer, vae, scheduler, id2label=None, latent_norm=None):
        super().__init__()
        # Importing DiffusionTransformer here also lets from_pretrained find it: diffusers loads
        # a component of a library of its own only from a module imported already.
        if not isinstance(transformer, DiffusionTransformer):
            raise TypeError(f"the transformer must be a DiffusionTransformer, not a {type(transformer).__name__}")
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler)
        id2label = {str(index): names for index, names in (id2label or {}).items()}
        self.register_to_config(id2label=id2label or None, latent_norm=latent_norm)
        # Each comma-separated name of a class maps to its index, as in DiTPipeline.
        self.labels = dict(sorted((name.strip(), int(index)) for index, names in id2label.items()
                                  for name in names.split(",")))

    def get_label_ids(self, names):
        """Class indices of ImageNet-style names ("white shark", ...)."""
        unknown = [name for name in names if name not in self.labels]
        if unknown:
            raise ValueError(f"unknown class names {unknown}; see pipe.labels")
        return [self.labels[name] for name in names]

    @property
    def latent_vae(self):
        """The VAE with the normalisation of the model's latents; None in pixel space."""
        if self.vae is None:
            return None
        norm = LatentNorm.from_record(self.config.get("latent_norm")) or LatentNorm.of_vae_config(self.vae.config)
        return LatentVAE(self.vae, norm)

    @torch.no_grad()
    def __call__(self, class_labels=None, guidance_scale=None, num_inference_steps=50, amm=None, generator=None,
                 cfg_channels=3, output_type="pil", return_dict=True, batch_size=None):
        """Samples one image per class label, or `batch_size` images of an unconditional model.

        guidance_scale: classifier-free guidance (1: none; default 4, and 1 for an unconditional
        model, which takes no other) on the first `cfg_channels` output channels (None: all);
        amm: None keeps the transformer's AMM blocks, True takes those it was converted with,
        False none, a list these blocks; generator: one torch.Generator per image
        (`sampling.sampler.image_generators(seed, range(n))` gives image_generator.py's noise), or
        one for all, or None (torch's default one). output_type "pil" gives PIL images, "np" a
        uint8 array (N, H, W, 3).
        """
        model = self.transformer.model
        labels = requested_labels(model, class_labels, batch_size)  # (N,)
        guidance_scale = checked_guidance_scale(model, guidance_scale)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        generators = per_image_generators(generator, len(labels))
        sampler = Sampler.for_scheduler(self.scheduler, num_inference_steps)
        model_fn = guided_model_fn(model, guidance_scale, cfg_channels)
        sample = sampler.sample_fn(model_fn, model_input_shape(model), self._execution_device, self.transformer.dtype)
        with amm_blocks(model, self.requested_amm_blocks(amm)):
            images = decode_to_uint8(self.latent_vae, sample(generators, labels))  # (N, H, W, 3) uint8
        if output_type == "pil":
            images = [Image.fromarray(image) for image in images]
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def requested_amm_blocks(self, amm):
        """The AMM block indices that `amm` asks for; None keeps the current ones."""
        if amm is None:
            return None
        if amm is True:
            converted = list(self.transformer.config.amm_blocks)
            if not converted:
                raise ValueError("the transformer was converted without AMM blocks: pass amm=[indices]")
            return converted
        return [] if amm is False else list(amm)


def requested_labels(model, class_labels, batch_size):
    """(N,) labels: the class labels given, or batch_size zeros for an unconditional model."""
    if model.unconditional:
        if class_labels is not None or batch_size is None:
            raise ValueError("the model is unconditional: give batch_size, not class_labels")
        return torch.zeros(batch_size, dtype=torch.long)
    if class_labels is None or batch_size is not None:
        raise ValueError("the model is class-conditional: give class_labels (see pipe.labels), not batch_size")
    return torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)


def checked_guidance_scale(model, guidance_scale):
    if model.unconditional:
        if guidance_scale not in (None, 1):
            raise ValueError(f"the model is unconditional: it samples without guidance, so guidance_scale "
                             f"must be 1, not {guidance_scale}")
        return 1.0
    guidance_scale = DEFAULT_GUIDANCE_SCALE if guidance_scale is None else guidance_scale
    if guidance_scale < 1:
        raise ValueError(f"guidance_scale must be at least 1, got {guidance_scale}")
    return guidance_scale


def per_image_generators(generator, count):
    """`count` generators: the list given, or one generator repeated (its draws then run
    image after image), or torch's default one."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != count:
            raise ValueError(f"{len(generator)} generators for {count} images; give one per image")
        return list(generator)
    return [generator if generator is not None else torch.default_generator] * count


@contextlib.contextmanager
def amm_blocks(model, blocks):
    """Runs the block with the AMM in `blocks` (None: as it is), then restores the model's."""
    if blocks is None:
        yield
        return
    before = model.amm_blocks
    model.set_amm_blocks(blocks)
    try:
        yield
    finally:
        model.set_amm_blocks(before)
