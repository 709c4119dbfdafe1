"""Tensors derived from a parameter for inference, kept until the parameter changes."""
import torch


class KeptTensor:
    """Holds `derive()` of one parameter; derives again whenever the parameter's version counter,
    storage, device or dtype, or inference mode, differs from when it was kept. Kept data is not
    model state: copies and pickles of a module start empty."""

    def __init__(self):
        self.tensor, self.kept_for = None, None

    def get(self, parameter, derive):
        state = (parameter._version, parameter.data_ptr(), parameter.device, parameter.dtype,
                 torch.is_inference_mode_enabled())
        if self.kept_for != state:
            self.tensor, self.kept_for = derive(), state
        return self.tensor

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()
