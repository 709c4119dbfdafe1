"""EDT (or DiT, MDTv2) as a diffusers pipeline, like diffusers' DiTPipeline:

    pipe = EDTPipeline.from_pretrained("edt-s-2-pipeline")       # models.to_diffusers wrote it
    images = pipe(class_labels=[207, 360], guidance_scale=4.0, num_inference_steps=25, amm=True,
                  generator=image_generators(0, range(2))).images   # PIL images

It samples with the scripts' sampling functions (sampling/sampler.py): the same noise, sampler
and steps give image_generator.py's images. Its scheduler chooses the sampler
(sampling/solvers.py: `pipe.scheduler = edt_scheduler("unipc")` switches to UniPC).
"""
import contextlib

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from PIL import Image

from models.diffusers_wrapper import DiffusionTransformer

from .images import decode_to_uint8
from .loading import model_input_shape
from .sampler import Sampler, guided_model_fn

OUTPUT_TYPES = ("pil", "np")


class EDTPipeline(DiffusionPipeline):
    """transformer: a models.diffusers_wrapper.DiffusionTransformer; vae: the AutoencoderKL, or
    None for a pixel-space model; scheduler: one of `sampling.solvers.edt_scheduler`'s;
    id2label: {class index: "name, other name, ..."} (ImageNet's names, say), or None."""

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]

    def __init__(self, transformer, vae, scheduler, id2label=None):
        super().__init__()
        # Importing DiffusionTransformer here also lets from_pretrained find it: diffusers loads
        # a component of a library of its own only from a module imported already.
        if not isinstance(transformer, DiffusionTransformer):
            raise TypeError(f"the transformer must be a DiffusionTransformer, not a {type(transformer).__name__}")
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler)
        id2label = {str(index): names for index, names in (id2label or {}).items()}
        self.register_to_config(id2label=id2label or None)
        # Each comma-separated name of a class maps to its index, as in DiTPipeline.
        self.labels = dict(sorted((name.strip(), int(index)) for index, names in id2label.items()
                                  for name in names.split(",")))

    def get_label_ids(self, names):
        """Class indices of ImageNet-style names ("white shark", ...)."""
        unknown = [name for name in names if name not in self.labels]
        if unknown:
            raise ValueError(f"unknown class names {unknown}; see pipe.labels")
        return [self.labels[name] for name in names]

    @torch.no_grad()
    def __call__(self, class_labels, guidance_scale=4.0, num_inference_steps=50, amm=None, generator=None,
                 cfg_channels=3, output_type="pil", return_dict=True):
        """Samples one image per class label.

        guidance_scale: classifier-free guidance (1: none) on the first `cfg_channels` output
        channels (None: all); amm: None keeps the transformer's AMM blocks, True takes those it
        was converted with, False none, a list these blocks; generator: one torch.Generator per
        image (`sampling.sampler.image_generators(seed, range(n))` gives image_generator.py's
        noise), or one for all, or None (torch's default one). output_type "pil" gives PIL
        images, "np" a uint8 array (N, H, W, 3).
        """
        if guidance_scale < 1:
            raise ValueError(f"guidance_scale must be at least 1, got {guidance_scale}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        model = self.transformer.model
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)  # (N,)
        generators = per_image_generators(generator, len(labels))
        sampler = Sampler.for_scheduler(self.scheduler, num_inference_steps)
        model_fn = guided_model_fn(model, guidance_scale, cfg_channels)
        sample = sampler.sample_fn(model_fn, model_input_shape(model), self._execution_device, self.transformer.dtype)
        with amm_blocks(model, self.requested_amm_blocks(amm)):
            images = decode_to_uint8(self.vae, sample(generators, labels))  # (N, H, W, 3) uint8
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
