"""Any model of this package (EDT, DiT, MDTv2) as a diffusers model: `save_pretrained` writes
its weights as safetensors and a config.json that rebuilds it, `from_pretrained` reads them
back, offline from a local folder."""
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from . import create_model


class DiffusionTransformer(ModelMixin, ConfigMixin):
    """Holds `model`, built as create_model(model_name, **model_kwargs, amm_blocks=amm_blocks);
    its state dict is the model's under the prefix "model."."""

    @register_to_config
    def __init__(self, model_name, model_kwargs, amm_blocks=()):
        super().__init__()
        self.model = create_model(model_name, **model_kwargs, amm_blocks=list(amm_blocks))

    @classmethod
    def from_config_and_weights(cls, config, state_dict):
        """The wrapper of a models.model_config (its kwargs may name amm_blocks) and its weights."""
        kwargs = dict(config["kwargs"])
        wrapper = cls(config["name"], kwargs, amm_blocks=kwargs.pop("amm_blocks", ()))
        wrapper.model.load_state_dict(state_dict, strict=True)
        return wrapper.eval()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # Built on the meta device (diffusers' default), the constructor's non-persistent
        # buffers (relative position indices, AMM matrices) would stay empty.
        return super().from_pretrained(*args, **{**kwargs, "low_cpu_mem_usage": False})

    def forward(self, x, t, y):
        """x: (N, C, H, W); t: (N,) timesteps; y: (N,) labels -> (N, C_out, H, W)."""
        return self.model(x, t, y)
