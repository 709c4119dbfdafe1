"""EDT and DiT models, their registries, MAC counting and checkpoint loading."""
from runtime.checkpoint import load_checkpoint

from .dit import DiT_models
from .edt import EDT_models
from .macs import count_macs, count_trainable_parameters

ALL_MODELS = {**EDT_models, **DiT_models}


def create_model(name, **kwargs):
    """Builds any registered EDT or DiT model by name, e.g. create_model("EDT-S/2", input_size=32)."""
    if name not in ALL_MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(ALL_MODELS)}")
    return ALL_MODELS[name](**kwargs)
