"""What the web demo does without its page: loads checkpoints (one at a time), checks a request
and samples it with and without AMM through the scripts' sampling functions. Bad input raises
DemoInputError with a message for the page."""
import glob
import itertools
import os
import threading
import time
from dataclasses import dataclass

from runtime.checkpoint import CheckpointError
from runtime.vae import VAENotFoundError
from sampling.comparison import comparison_image, sample_with_and_without_amm
from sampling.loading import SamplingSetupError, load_sampling_model
from sampling.sampler import SAMPLERS, Sampler, guided_model_fn

QUICKSTART_CHECKPOINTS = os.path.join("quickstart_output", "results", "*", "checkpoints", "*.pt")
MAKE_CHECKPOINT = "python quickstart.py  (trains one into quickstart_output/ in about five minutes on CPU)"
COLUMNS = 4  # images per grid row
DISPLAY_SIDE = 128  # small images (8x8 digits) are enlarged to about this many pixels
UNCONDITIONAL_CLASS = "unconditional"


class DemoInputError(ValueError):
    """A request the demo cannot serve; its message is shown in the page."""


def quickstart_checkpoint():
    """The newest checkpoint quickstart.py wrote under ./quickstart_output, or None."""
    found = sorted(glob.glob(QUICKSTART_CHECKPOINTS))
    return found[-1] if found else None


#################################################################################
#                                  Checkpoints                                  #
#################################################################################

@dataclass
class DemoModel:
    ckpt: str
    loaded: object  # a SamplingModel
    amm_blocks: list  # the model's AMM blocks as loaded: the default comparison
    class_names: list  # one per class (an unconditional model's one class: UNCONDITIONAL_CLASS)

    @property
    def num_blocks(self):
        return len(self.loaded.model.blocks)


class CheckpointCache:
    """Holds the model of the last checkpoint asked for; its lock keeps one request at a time
    on it (sampling switches its AMM blocks) and one load at a time."""

    def __init__(self, vae_path=None, class_names=None, device="cpu"):
        self.vae_path = vae_path
        self.class_names = class_names
        self.device = device
        self.current = None
        self.lock = threading.RLock()

    def get(self, ckpt):
        """The DemoModel of `ckpt`, loading it unless it is the current one."""
        with self.lock:
            return self.current if self.current is not None and self.current.ckpt == ckpt else self.load(ckpt)

    def load(self, ckpt):
        if not os.path.isfile(ckpt):
            raise DemoInputError(f"no checkpoint at {ckpt!r}; to train one: {MAKE_CHECKPOINT}")
        try:
            loaded = load_sampling_model(ckpt, vae_path=self.vae_path, device=self.device)
        except (CheckpointError, VAENotFoundError, SamplingSetupError) as error:
            raise DemoInputError(str(error)) from None
        self.current = DemoModel(ckpt, loaded, loaded.model.amm_blocks, self.names_for(loaded))
        return self.current

    def names_for(self, loaded):
        """The app's --class-names when they fit the model, else the checkpoint's, else indices."""
        if loaded.unconditional:
            return [UNCONDITIONAL_CLASS]
        if self.class_names and len(self.class_names) == loaded.num_classes:
            return list(self.class_names)
        return list(loaded.class_names or map(str, range(loaded.num_classes)))


#################################################################################
#                                   Requests                                    #
#################################################################################

def whole_number(value, name):
    """A page field's number as an int; DemoInputError when the field is empty."""
    if value is None or value == "":
        raise DemoInputError(f"{name} is empty")
    return int(value)


@dataclass
class Request:
    ckpt: str
    class_label: object  # an index, or what the user typed
    cfg_scale: float
    sampler: str
    num_steps: int
    seed: int
    num_images: int
    amm_blocks: list


def parse_class(value, demo_model):
    """The class index of a dropdown value: an index, or a class name."""
    names = demo_model.class_names
    text = str(value).strip()
    if text in names:
        return names.index(text)
    try:
        label = int(float(text))
    except ValueError:
        raise DemoInputError(f"unknown class {text!r}; give a name from the list or an index") from None
    if not 0 <= label < len(names):
        raise DemoInputError(f"class {label} is out of range: this model has classes 0 .. {len(names) - 1}")
    return label


def check_request(request, demo_model, max_images):
    """The Sampler of a valid request; DemoInputError otherwise."""
    if not 1 <= request.num_images <= max_images:
        raise DemoInputError(f"{request.num_images} images asked for: between 1 and {max_images} "
                             "(the app's --max-images)")
    if request.seed < 0:
        raise DemoInputError("the seed must be at least 0")
    if request.cfg_scale < 1.0:
        raise DemoInputError("the guidance scale must be at least 1")
    if demo_model.loaded.unconditional and request.cfg_scale != 1.0:
        raise DemoInputError("this model is unconditional: it samples without guidance, so the guidance scale must be 1")
    if not request.amm_blocks:
        raise DemoInputError("choose at least one AMM block to compare with no AMM")
    bad = [index for index in request.amm_blocks if not 0 <= index < demo_model.num_blocks]
    if bad:
        raise DemoInputError(f"AMM blocks {bad} out of range for {demo_model.num_blocks} blocks")
    if request.sampler not in SAMPLERS:
        raise DemoInputError(f"unknown sampler {request.sampler!r}; choose from {', '.join(SAMPLERS)}")
    if request.num_steps < 1:
        raise DemoInputError("the number of sampling steps must be at least 1")
    try:
        return Sampler(request.sampler, request.num_steps)
    except ValueError as error:
        raise DemoInputError(f"{request.num_steps} {request.sampler} steps: {error}") from None


def counting_calls(model_fn, on_call):
    """model_fn that calls on_call() after each forward: one per sampling step and batch."""
    def counted(x, t, y):
        out = model_fn(x, t, y)
        on_call()
        return out
    return counted


#################################################################################
#                                   Sampling                                    #
#################################################################################

def generate(cache, request, max_images, batch_size, report=None):
    """(uint8 image: with AMM left, without right; a one-line summary). report(done, total)
    is called after each model forward."""
    with cache.lock:
        demo_model = cache.get(request.ckpt)
        label = parse_class(request.class_label, demo_model)
        sampler = check_request(request, demo_model, max_images)
        loaded = demo_model.loaded
        batches = -(-request.num_images // batch_size)
        total = 2 * batches * request.num_steps  # forwards: both settings, every batch and step
        calls = itertools.count(1)
        model_fn = guided_model_fn(loaded.model, request.cfg_scale)
        if report is not None:
            model_fn = counting_calls(model_fn, lambda: report(min(next(calls), total), total))
        sample = sampler.sample_fn(model_fn, loaded.latent_shape, cache.device, loaded.dtype)
        start = time.perf_counter()
        with_amm, without_amm = sample_with_and_without_amm(
            sample, loaded, sorted(request.amm_blocks), request.seed, [label] * request.num_images, batch_size)
        seconds = time.perf_counter() - start
    zoom = max(1, DISPLAY_SIDE // loaded.image_size)
    image = comparison_image(with_amm, without_amm, min(COLUMNS, request.num_images), zoom)
    name = demo_model.class_names[label]
    summary = (f"class {label}{'' if name == str(label) else f' ({name})'}, {request.num_images} per side: "
               f"AMM in blocks {sorted(request.amm_blocks)} (left) and none (right), same noise; "
               f"{request.sampler} {request.num_steps} steps, guidance {request.cfg_scale:g}, seed "
               f"{request.seed}, {loaded.image_size}x{loaded.image_size} px on {cache.device}, "
               f"{seconds:.1f} s")
    return image, summary
