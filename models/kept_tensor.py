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

    def forget(self):
        """Frees the kept tensor; the next `get` derives it again."""
        self.__init__()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()


def kept_tensors(module):
    """Every KeptTensor of module and its submodules, held as an attribute or in a dict attribute."""
    for submodule in module.modules():
        for value in vars(submodule).values():
            for candidate in value.values() if isinstance(value, dict) else (value,):
                if isinstance(candidate, KeptTensor):
                    yield candidate


def forget_kept_tensors(module):
    """Frees what module keeps for inference (autocast casts, packed and padded weights, gathered
    biases), e.g. an EMA model's between evaluations during training: the EMA update changes its
    parameters at every step, so the next evaluation derives them again anyway, and for EDT-XL/2
    in bf16 they hold about 1.4 GB."""
    for kept in kept_tensors(module):
        kept.forget()


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
