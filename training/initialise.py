"""Fine-tuning (--init-from): a newly built model takes every weight of a released or earlier
checkpoint that fits it, and keeps its own initialisation where another class list, token grid
or latent channel count makes a tensor differ. Anything else that does not fit (another width,
depth or model) stops the run with one line.

Class rows are kept by name: a run on ImageNet-100 folders keeps the 100 rows of the released
1000-class table whose synsets it shares. The null row (classifier-free guidance) is the
checkpoint's, and an unconditional model's only row starts from it.
"""
import re
from dataclasses import dataclass, field
from typing import Optional

import torch

from runtime.checkpoint import CheckpointError, extract_state_dict, read_checkpoint, summarise
from sampling.labels import read_class_names

from .config import ConfigError, check_model_builds

DEFAULT_INIT_KEY = "ema"
CLASS_TABLE = "y_embedder.embedding_table.weight"
# Tensors sized by the token grid, by the last part of their name, with the axes the grid sets.
GRID_AXES = {"pos_embed": (1,), "decoder_pos_embed": (1,), "relative_position_bias_table": (0,),
             "relative_position_index": (0, 1)}
# Tensors sized by the latent channel count, with the axis it sets.
CHANNEL_AXES = {"x_embedder.proj.weight": 1, "final_layer.linear.weight": 0, "final_layer.linear.bias": 0}
SHOWN_NAMES = 6  # names listed per kind in the log and in errors


#################################################################################
#                               Command line                                    #
#################################################################################

def add_init_arguments(parser):
    group = parser.add_argument_group("fine-tuning")
    group.add_argument("--init-from", default=None, metavar="CKPT",
                       help="start from this checkpoint's weights (released or of this script), "
                            "keeping class rows by name; --resume takes precedence")
    group.add_argument("--init-key", choices=["ema", "model"], default=None,
                       help=f"which weights of a training checkpoint (default {DEFAULT_INIT_KEY})")
    group.add_argument("--init-class-names", default=None, metavar="FILE",
                       help="the checkpoint's class names, one per line or id2label JSON (e.g. ImageNet's "
                            "synsets); default: the names the checkpoint records")


def check_init_flags(args):
    """SystemExit with one line for --init-key or --init-class-names without --init-from."""
    if args.init_from is None:
        given = [option for option, value in (("--init-key", args.init_key),
                                              ("--init-class-names", args.init_class_names)) if value]
        if given:
            raise SystemExit(f"error: {given[0]} needs --init-from")
    args.init_key = args.init_key or DEFAULT_INIT_KEY


#################################################################################
#                                   Report                                      #
#################################################################################

@dataclass
class InitReport:
    """What a model took from a checkpoint and what kept its own initialisation."""
    total: int  # tensors in the model's state dict
    loaded: list = field(default_factory=list)  # keys loaded whole
    class_line: str = ""  # what the class table got
    new_grid: list = field(default_factory=list)  # grid tensors left as initialised
    grid: Optional[tuple] = None  # (checkpoint's, model's) token grid side, when they differ
    new_channels: list = field(default_factory=list)  # channel tensors left as initialised
    channels: Optional[tuple] = None  # (checkpoint's, model's) latent channels, when they differ

    def lines(self, source):
        lines = [f"initialised from {source}: {len(self.loaded)} of {self.total} tensors loaded",
                 f"class table: {self.class_line}"]
        if self.new_grid:
            lines.append(f"new (grid {self.grid[0]} -> {self.grid[1]}): {listed(self.new_grid)}")
        if self.new_channels:
            lines.append(f"new (latent channels {self.channels[0]} -> {self.channels[1]}): "
                         f"{listed(self.new_channels)}")
        return lines


def listed(names):
    return ", ".join(map(str, summarise(list(names), SHOWN_NAMES)))


def in_parentheses(names):
    return f" ({listed(names)})" if names else ""


#################################################################################
#                          Which tensors fit, and how                           #
#################################################################################

def differs_only_along(theirs, ours, axes):
    return len(theirs) == len(ours) and all(a == b for axis, (a, b) in enumerate(zip(theirs, ours))
                                            if axis not in axes)


def grid_side(pos_embed):
    """The token grid side of a (1, T, D) position table, T = side ** 2."""
    return round(pos_embed.shape[1] ** 0.5)


def module_kinds(state_dict):
    """Keys with their indices dropped: the same for two depths of one model."""
    return {re.sub(r"\d+", "#", key) for key in state_dict}


def latent_channels_differ(state_dict, ours):
    """Whether the patch embedding differs only in its input channels (another VAE)."""
    key = "x_embedder.proj.weight"
    return (key in state_dict and state_dict[key].shape != ours[key].shape
            and differs_only_along(state_dict[key].shape, ours[key].shape, (CHANNEL_AXES[key],)))


def classify(key, theirs, ours, channels_differ):
    """'load', 'grid', 'channels' or 'misfit' for a key of both state dicts (not the class table)."""
    if theirs.shape == ours.shape:
        return "load"
    grid_axes = GRID_AXES.get(key.rsplit(".", 1)[-1])
    if grid_axes and differs_only_along(theirs.shape, ours.shape, grid_axes):
        return "grid"
    if channels_differ and key in CHANNEL_AXES and differs_only_along(theirs.shape, ours.shape, (CHANNEL_AXES[key],)):
        return "channels"
    return "misfit"


def plan_loading(state_dict, ours, source, model_name):
    """{key: 'load', 'grid' or 'channels'} for every key of `ours` but the class table;
    ConfigError naming the first keys that fit none of these, and what probably differs."""
    channels_differ = latent_channels_differ(state_dict, ours)
    plan = {key: classify(key, state_dict[key], ours[key], channels_differ)
            for key in ours if key in state_dict and key != CLASS_TABLE}
    missing = sorted(set(ours) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(ours))
    misfits = [key for key, kind in plan.items() if kind == "misfit"]
    if CLASS_TABLE in state_dict and state_dict[CLASS_TABLE].shape[1:] != ours[CLASS_TABLE].shape[1:]:
        misfits.insert(0, CLASS_TABLE)
    if not (missing or unexpected or misfits):
        return plan
    if module_kinds(state_dict) != module_kinds(ours):
        differs = "model"
    elif missing or unexpected:
        differs = "depth"
    else:
        differs = "width (or patch size)"
    shapes = [f"{key} {tuple(state_dict[key].shape)} vs {tuple(ours[key].shape)}" for key in misfits]
    parts = [f"{len(names)} {kind}: {listed(names)}"
             for kind, names in (("missing keys", missing), ("unexpected keys", unexpected),
                                 ("other shapes", shapes)) if names]
    raise ConfigError(f"{source} does not fit this {model_name}: the {differs} differs; {'; '.join(parts)}")


#################################################################################
#                                 Class table                                   #
#################################################################################

def checkpoint_class_count(table, class_names):
    """Classes of a checkpoint's table: one per name, or (unnamed) every row but the last,
    its null row, as in the released 1000-class tables; a single row is an unconditional model."""
    if class_names is None:
        return max(len(table) - 1, 1)
    if len(table) not in (len(class_names), len(class_names) + 1):
        raise ConfigError(f"the checkpoint's class names list {len(class_names)} classes but its class "
                          f"table has {len(table)} rows")
    return len(class_names)


def unconditional_row(table, num_classes):
    """The checkpoint's learned unconditional embedding: its null row, or the only row of an
    unconditional model; None for a table without a null row."""
    if len(table) > num_classes:
        return table[num_classes]
    return table[0] if len(table) == 1 else None


def keep_rows_by_name(table, theirs, class_names, checkpoint_class_names):
    """Copies the checkpoint's row of each class it names into `table`; (kept, new) names."""
    their_rows = {}
    for row, name in enumerate(checkpoint_class_names):
        their_rows.setdefault(name, row)  # the first row of a repeated name
    for label, name in enumerate(class_names):
        if name in their_rows:
            table[label] = theirs[their_rows[name]]
    return ([name for name in class_names if name in their_rows],
            [name for name in class_names if name not in their_rows])


def carry_class_rows(table, theirs, num_classes, their_classes, class_names, checkpoint_class_names):
    """Copies into `table` ((num_classes [+ 1 null row], D), the new model's) the rows of the
    classes both sides name and the checkpoint's unconditional row; returns the log's line."""
    their_row = unconditional_row(theirs, their_classes)
    if len(table) == num_classes == 1:  # an unconditional model: no null row, one class row
        if their_row is None:
            return "unconditional, its row is new (the checkpoint has no null row)"
        table[0] = their_row
        return "unconditional, its row is the checkpoint's null row"
    null_row = ""
    if len(table) > num_classes:
        if their_row is not None:
            table[num_classes] = their_row
        null_row = ", null row carried" if their_row is not None else ", null row new (the checkpoint has none)"
    if class_names is None or checkpoint_class_names is None:
        unnamed = ("the checkpoint names no classes; see --init-class-names" if class_names
                   else "this run names no classes")
        return f"no class row kept ({unnamed}), {num_classes} new{null_row}"
    kept, new = keep_rows_by_name(table, theirs, class_names, checkpoint_class_names)
    return (f"{len(kept)} of {num_classes} classes kept by name{in_parentheses(kept)}, "
            f"{len(new)} new{in_parentheses(new)}{null_row}")


#################################################################################
#                                 Initialisation                                #
#################################################################################

@torch.no_grad()
def initialise_from(model, state_dict, class_names=None, checkpoint_class_names=None, source="checkpoint",
                    model_name=None):
    """Loads into `model` (built as for a new run) every tensor of `state_dict` that fits, the
    class rows named on both sides (`class_names`: the model's classes in index order) and the
    null row; grid- and channel-sized tensors that differ keep the model's initialisation.
    Returns an InitReport; raises ConfigError, before changing anything, when the rest does not fit."""
    ours = model.state_dict()  # shares storage with the model: copying into it loads
    plan = plan_loading(state_dict, ours, source, model_name or type(model).__name__)
    their_classes = checkpoint_class_count(state_dict[CLASS_TABLE], checkpoint_class_names)
    report = InitReport(total=len(ours))
    for key, kind in plan.items():
        if kind == "load":
            ours[key].copy_(state_dict[key])
        {"load": report.loaded, "grid": report.new_grid, "channels": report.new_channels}[kind].append(key)
    if "pos_embed" in report.new_grid:
        report.grid = (grid_side(state_dict["pos_embed"]), grid_side(ours["pos_embed"]))
    if report.new_channels:
        report.channels = (state_dict["x_embedder.proj.weight"].shape[1], model.in_channels)
    report.class_line = carry_class_rows(ours[CLASS_TABLE], state_dict[CLASS_TABLE], model.y_embedder.num_classes,
                                         their_classes, class_names, checkpoint_class_names)
    return report


#################################################################################
#                               Checkpoint and run                              #
#################################################################################

def read_initial_weights(path, key, class_names_file, model_name):
    """(state dict, the checkpoint's class names or None) for --init-from: a raw state dict or a
    checkpoint's `key` weights; the names of --init-class-names, else those it records.
    Raises ConfigError."""
    try:
        checkpoint = read_checkpoint(path)
        state_dict = extract_state_dict(checkpoint, key, path)
    except CheckpointError as error:
        raise ConfigError(f"--init-from: {error}") from None
    described = {} if state_dict is checkpoint else checkpoint
    saved_name = (described.get("model_config") or {}).get("name")
    if saved_name is not None and saved_name != model_name:
        raise ConfigError(f"--init-from {path} holds a {saved_name} model, this run trains {model_name}")
    if class_names_file is None:
        return state_dict, described.get("class_names")
    try:
        return state_dict, read_class_names(class_names_file)
    except (OSError, ValueError) as error:
        raise ConfigError(f"--init-class-names {class_names_file}: {error}") from None


def check_init_from(args, config):
    """ConfigError, before any work, for an --init-from checkpoint that cannot initialise this
    run's model. A run given --resume may resume instead, so it is checked when it is built."""
    if args.init_from is None or args.resume is not None:
        return
    state_dict, checkpoint_class_names = read_initial_weights(args.init_from, args.init_key, args.init_class_names,
                                                              config.model_name)
    ours = check_model_builds(config.model_config).state_dict()  # shapes only, on the meta device
    plan_loading(state_dict, ours, f"{args.init_from} [{args.init_key}]", config.model_name)
    checkpoint_class_count(state_dict[CLASS_TABLE], checkpoint_class_names)


def initialise_model(args, config, run, model):
    """--init-from: loads what fits into the newly built `model` and logs what was kept and what
    is new. A resumed run has its own weights, so it skips this."""
    if args.init_from is None:
        return
    if run.resume_checkpoint is not None:
        run.logger.info(f"resuming, so --init-from {args.init_from} is not applied")
        return
    state_dict, checkpoint_class_names = read_initial_weights(args.init_from, args.init_key, args.init_class_names,
                                                              config.model_name)
    source = f"{args.init_from} [{args.init_key}]"
    report = initialise_from(model, state_dict, config.class_names, checkpoint_class_names, source,
                             config.model_name)
    for line in report.lines(source):
        run.logger.info(line)
