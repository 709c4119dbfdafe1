"""EDT, DiT and MDTv2 models, their registries, MAC counting and checkpoint loading."""
from runtime.checkpoint import load_checkpoint

from .blocks import GuidedDiffusionModel
from .dit import DiT, DiT_models
from .edt import EDT, EDT_models
from .macs import count_macs, count_masked_macs, count_trainable_parameters
from .mdt import MDT_models, MDTv2

__all__ = ["ALL_MODELS", "CUSTOM_MODELS", "DiT", "DiT_models", "EDT", "EDT_models", "GuidedDiffusionModel",
           "MDT_models", "MDTv2", "build_model", "count_macs", "count_masked_macs", "count_trainable_parameters", "create_model",
           "load_checkpoint", "model_class", "model_config"]

ALL_MODELS = {**EDT_models, **DiT_models, **MDT_models}
# Bare class names build custom sizes from explicit arguments (dims, num_heads, depths, ...).
CUSTOM_MODELS = {"EDT": EDT, "DiT": DiT, "MDTv2": MDTv2}


def create_model(name, **kwargs):
    """Builds a registered model, e.g. create_model("EDT-S/2", input_size=32), or a custom one,
    e.g. create_model("EDT", dims=(64,) * 5, num_heads=(2,) * 5, depths=(1,) * 5, patch_size=1)."""
    builders = {**ALL_MODELS, **CUSTOM_MODELS}
    if name not in builders:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(builders)}")
    return builders[name](**kwargs)


def model_class(name):
    """The class a registered or bare model name builds (EDT-S/2 -> EDT)."""
    return CUSTOM_MODELS[name.split("-")[0]]


def model_config(name, **kwargs):
    """What a checkpoint records (under "model_config") to rebuild its model with `build_model`."""
    return {"name": name, "kwargs": kwargs}


def build_model(config):
    return create_model(config["name"], **config["kwargs"])
