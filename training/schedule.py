"""The learning-rate schedule: linear from the initial to the final rate, then flat."""
DEFAULT_INIT_LR = 1e-3
XL_INIT_LR = 5e-4  # the released XL models were trained with half the rate


def default_init_lr(model_name):
    return XL_INIT_LR if "-XL/" in model_name else DEFAULT_INIT_LR


def learning_rate(step, init_lr, final_lr, decay_steps):
    """The rate of optimizer update number `step` (0-based)."""
    if decay_steps <= 0 or step >= decay_steps:
        return final_lr
    return init_lr + (final_lr - init_lr) * step / decay_steps


def set_learning_rate(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr
