"""The switch between the fast paths and the plain path, which does the reference
implementation's operations one by one."""


class FastPathSwitch:
    """Marks a module whose `fast` attribute chooses its fast or its plain computation;
    `GuidedDiffusionModel.set_fast_paths` sets it on every such module of a model."""

    fast = True
