"""diffusers' fast solvers on EDT's diffusion: DPM-Solver++ (and its SDE variant), UniPC and Euler.

Each is a diffusers scheduler set up with EDT's 1000 linear betas (diffusion/gaussian_diffusion.py)
and driven by the model's epsilon, the first C of its 2C output channels. The learned variance is
not handed over: these solvers do not use it, and DPMSolverMultistepScheduler's
variance_type="learned_range" only cuts the output to 3 channels (RGB), which breaks 4-channel
latents. An image's start noise, and the SDE solver's step noise, come from its own generator.

The pipeline (sampling/pipeline.py) holds one of these schedulers, or a DDPMScheduler or
DDIMScheduler standing for EDT's own respaced DDPM and DDIM (diffusion/respace.py), the loops
that the scripts run, so that pipeline and scripts give the same images. The loops themselves
are in sampling/sampler.py.
"""
from dataclasses import dataclass, field

import numpy as np

from diffusion.gaussian_diffusion import get_named_beta_schedule

TRAINING_STEPS = 1000  # the diffusion EDT trains on (create_diffusion's diffusion_steps)
MULTISTEP_MAX_STEPS = TRAINING_STEPS - 1  # more would repeat an integer timestep (a zero step)


@dataclass(frozen=True)
class Solver:
    scheduler_name: str  # a diffusers scheduler class
    options: dict = field(default_factory=dict)
    min_steps: int = 1
    max_steps: int = MULTISTEP_MAX_STEPS

    @property
    def scheduler_class(self):
        # diffusers is imported on first use: its import takes seconds (torch._dynamo, scipy.stats),
        # which training and the respaced samplers, importing this module, mostly do not need.
        import diffusers

        return getattr(diffusers, self.scheduler_name)


SOLVERS = {
    "dpm-solver++": Solver("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm-solver++-sde": Solver("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": Solver("UniPCMultistepScheduler"),
    # One Euler step would sit at t = 0 (diffusers spaces Euler's steps over both ends).
    "euler": Solver("EulerDiscreteScheduler", min_steps=2, max_steps=TRAINING_STEPS),
}
# The respaced samplers' stand-ins in a pipeline: only their betas are read.
RESPACED_STAND_INS = {
    "ddpm": Solver("DDPMScheduler", {"variance_type": "learned_range", "clip_sample": False}),
    "ddim": Solver("DDIMScheduler", {"clip_sample": False}),
}
SCHEDULERS = {**RESPACED_STAND_INS, **SOLVERS}


#################################################################################
#                         Schedulers on EDT's diffusion                         #
#################################################################################

def edt_betas():
    """EDT's (T,) float64 linear betas."""
    return get_named_beta_schedule("linear", TRAINING_STEPS)


def edt_scheduler(method):
    """The diffusers scheduler of sampling method `method` on EDT's betas."""
    solver = SCHEDULERS[method]
    return solver.scheduler_class(num_train_timesteps=TRAINING_STEPS, trained_betas=edt_betas().tolist(),
                                  **solver.options)


def scheduler_method(scheduler):
    """The sampling method that a scheduler of `edt_scheduler` stands for; ValueError for
    another kind of scheduler or betas other than EDT's."""
    methods = [method for method, solver in SCHEDULERS.items()
               if type(scheduler) is solver.scheduler_class
               and scheduler.config.get("algorithm_type") == solver.options.get("algorithm_type")]
    if not methods:
        names = sorted({solver.scheduler_name for solver in SCHEDULERS.values()})
        raise ValueError(f"EDT samples with a {', '.join(names)} (DPM-Solver++: dpmsolver++ or "
                         f"sde-dpmsolver++), not a {type(scheduler).__name__}")
    if not np.array_equal(scheduler.betas.numpy(), edt_betas().astype(np.float32)):
        raise ValueError(f"the {type(scheduler).__name__} has other betas than EDT's {TRAINING_STEPS} linear ones")
    return methods[0]


def check_solver_steps(method, num_steps):
    solver = SOLVERS[method]
    if not solver.min_steps <= num_steps <= solver.max_steps:
        raise ValueError(f"{method} takes {solver.min_steps} to {solver.max_steps} steps")
