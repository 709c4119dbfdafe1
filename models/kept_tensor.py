"""Tensors derived from parameters for inference, kept until the parameters change."""
import torch


class KeptTensor:
    """Holds `derive()` of one parameter or a list of them; derives again whenever a parameter's
    version counter, storage, device or dtype, inference mode or `context` (what else the derived
    value depends on) differs from when it was kept. Kept data is not model state: copies and
    pickles of a module start empty."""

    def __init__(self):
        self.tensor, self.kept_for = None, None

    def get(self, parameters, derive, context=None):
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        state = ([(parameter._version, parameter.data_ptr(), parameter.device, parameter.dtype)
                  for parameter in parameters], torch.is_inference_mode_enabled(), context)
        if self.kept_for != state:
            self.tensor, self.kept_for = derive(), state
        return self.tensor

    def get_at_inference(self, parameters, derive, context=None):
        """`get`, except under autograd (the gradient must flow to the parameters) and
        torch.compile, where derive() runs anew."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return derive()
        return self.get(parameters, derive, context)

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()


def inference_autocast_dtype(device_type):
    """Autocast's dtype where a matmul on device_type would be autocast at inference (no autograd,
    outside torch.compile), else None. Weights kept in that dtype spare autocast two casts per
    matmul and call, launches that set the pace of small-batch sampling on a GPU."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def as_autocast_casts(tensors, dtype):
    """The tensors as autocast casts a matmul's float32 operands to dtype (None: unchanged)."""
    if dtype is None:
        return tensors
    return tuple(tensor.to(dtype) if tensor is not None and tensor.dtype == torch.float32 else tensor
                 for tensor in tensors)
