"""Every configuration key, with its default and a one-line comment.

The tree is `Config(model, data, masks, loss, optim, train, eval)`. Most defaults follow
the official iBOT arguments (`main_ibot.py`); those of the head and the crops follow the
paper's ViT-S/16 recipe instead (shared_head, norm_last_layer false, 10 local crops,
pred_ratio 0 0.3 with pred_ratio_var 0 0.2, where the official defaults are false, true,
0 and 0.3 / 0), and precision is bf16 on a GPU (official: fp16 with a gradient scaler).
Paper recipes are small named presets (`PRESETS`), applied on top of the defaults;
then a YAML file (`--config`), nested as `ibot-fast keys` names the keys; command-line
overrides are dotted keys applied last:

    ibot-fast train --preset vit_small_16_paper --data /data/imagenet/train \\
        train.batch_size=64 optim.lr=0.0005 data.n_local=8
    ibot-fast keys --preset vit_small_16_paper --yaml > vits16.yaml   # every key, commented
    ibot-fast train --config vits16.yaml --data /data/imagenet/train train.batch_size=64

The comment beside each field below is that key's documentation: `key_comments` reads
it from this file's source for the YAML that `to_yaml` writes.

Derived values (the lr scaled by the global batch) are computed in one place,
`derived(cfg, world_size)`, and the resolved config is written next to the checkpoints
(config.yaml, which `--config` reads back, and config.json with the derived values).
"""
import dataclasses
import difflib
import functools
import inspect
import io
import json
import re
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import Tuple

from . import UserError


@dataclass
class ModelConfig:
    arch: str = "vit_small"  # vit_demo | vit_small | vit_base | vit_large (see models/vit.py)
    patch_size: int = 16  # patch side in pixels
    drop_path_rate: float = 0.1  # student stochastic depth: linspace(0, rate, depth)
    efficient_drop_path: bool = False  # skip the dropped samples' residual branch (DINOv2)
    attention: str = "auto"  # auto | xformers | sdpa | math | varlen (models/attention.py)
    pack_crops: bool = False  # student: global + local crops in one packed pass
    residual_fp32: bool = False  # autocast: fp32 residual stream (official iBOT under AMP)
    layernorm_fp32: bool = True  # autocast: LayerNorm in fp32 (CUDA's); false: in bf16/fp16
    activation_checkpointing: str = "none"  # none|selective|selective_mlp|full (models/vit.py)
    out_dim: int = 8192  # K: prototypes of the CLS head (last_layer)
    patch_out_dim: int = 8192  # K2: prototypes of the patch head (last_layer2)
    shared_head: bool = True  # last_layer2 is last_layer (student and teacher)
    norm_last_layer: bool = False  # freeze the weight-norm scale g = 1 of the last layer(s)
    head_hidden_dim: int = 2048  # head MLP width
    head_bottleneck_dim: int = 256  # head MLP output, L2-normalised, input of the last layer
    head_layers: int = 3  # head MLP depth
    init_from: str = ""  # start a new run from these weights (pretrained.py); "" = random
    init_which: str = "teacher"  # teacher | student: the network taken from a training run


@dataclass
class DataConfig:
    source: str = "digits"  # digits (embedded) | folder | webdataset | synthetic
    path: str = ""  # folder: ImageFolder root; webdataset: shards (folder, glob, a{00..99}.tar)
    pipeline: str = "auto"  # auto (DALI when it imports and a GPU is present) | cpu | dali
    global_size: int = 224  # global crop side (px)
    local_size: int = 96  # local crop side (px)
    n_local: int = 10  # local crops per image (0 works)
    global_scale: Tuple[float, float] = (0.14, 1.0)  # RandomResizedCrop area range, global
    local_scale: Tuple[float, float] = (0.05, 0.4)  # RandomResizedCrop area range, local
    blur_sigma: Tuple[float, float] = (0.1, 2.0)  # Gaussian blur sigma range, in pixels
    color_jitter_p: float = 0.8  # colour jitter probability, every crop
    solarize_p: float = 0.2  # solarisation probability, global crop 2
    num_workers: int = 8  # DataLoader worker processes (cpu pipeline) / DALI threads
    prefetch: int = 2  # batches prefetched per worker (cpu) / queue depth (dali)
    synthetic_size: int = 4096  # images in the synthetic source
    max_bad_fraction: float = 0.01  # abort when more than this fraction of reads failed


@dataclass
class MaskConfig:
    enabled: bool = True  # masked image modelling (iBOT); false gives DINO's loss only
    sampler: str = "iid"  # iid (official, per crop) | stratified (fixed count per batch)
    pred_ratio: Tuple[float, ...] = (0.0, 0.3)  # centres of the ratio choices (official flag)
    pred_ratio_var: Tuple[float, ...] = (0.0, 0.2)  # half-widths of the ratio choices
    pred_start_epoch: int = 0  # no masking before this epoch
    pred_shape: str = "block"  # block (BEiT's blocks) | rand (uniform patches), official flag
    pred_aspect: float = 0.3  # block aspect ratio is log-uniform in (a, 1/a)


@dataclass
class LossConfig:
    student_temp: float = 0.1  # ts
    warmup_teacher_temp: float = 0.04  # CLS teacher temperature at epoch 0
    teacher_temp: float = 0.04  # CLS teacher temperature after warm-up
    warmup_teacher_patch_temp: float = 0.04  # patch teacher temperature at epoch 0
    teacher_patch_temp: float = 0.07  # patch teacher temperature after warm-up
    warmup_teacher_temp_epochs: int = 30  # linear warm-up of both teacher temperatures
    center_momentum: float = 0.9  # CLS center EMA
    center_momentum2: float = 0.9  # patch center EMA
    lambda1: float = 1.0  # weight of the CLS (DINO) term
    lambda2: float = 1.0  # weight of the patch (MIM) term
    center2_from: str = "all"  # all (official: teacher head on all patches) | masked (DINOv2)
    centering: str = "center"  # center (iBOT: EMA center + sharpening) | sinkhorn (DINOv2)
    fused_last_layer: bool = False  # fast path: last layer + patch loss in one kernel
    koleo_weight: float = 0.0  # DINOv2's KoLeo term on the student's global CLS (0.1 there)


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw (torch) | apex_adamw | apex_lamb (apex must be installed)
    lr: float = 5e-4  # peak lr for a global batch of 256 (scaled linearly)
    min_lr: float = 1e-6  # final lr of the cosine schedule
    warmup_epochs: int = 10  # linear lr warm-up from 0
    betas: Tuple[float, float] = (0.9, 0.999)  # AdamW betas
    weight_decay: float = 0.04  # initial weight decay (cosine schedule)
    weight_decay_end: float = 0.4  # final weight decay
    clip_grad: float = 3.0  # max gradient norm; 0 disables clipping
    clip_mode: str = "per_param"  # per_param (official: each tensor on its own) | global
    freeze_last_layer: int = 1  # epochs during which the last layer's gradients are dropped
    momentum_teacher: float = 0.996  # teacher EMA momentum, cosine to 1
    fuse_ema: bool = False  # fast path: AdamW step and teacher EMA in one Triton pass


@dataclass
class TrainConfig:
    epochs: int = 100  # length of the schedules
    batch_size: int = 128  # images per process (global batch = batch_size x world size)
    impl: str = "reference"  # reference (official semantics, eager) | fast (fused kernels)
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    seed: int = 0  # all randomness (data, masks, init) derives from it
    output_dir: str = "runs/ibot"  # checkpoints, config.yaml/.json, log.jsonl, TensorBoard events
    save_every: int = 1  # write checkpoint.pth every N epochs (the one before: _previous)
    keep_every: int = 0  # also keep checkpoint{epoch:04d}.pth every N epochs; 0 = never
    save_every_iters: int = 0  # also write the checkpoint every N iterations; 0 = never
    trust_pickle: bool = False  # unpickle checkpoint/weights files of any type (runs code!)
    log_every: int = 10  # JSON log line (and the only host syncs) every N iterations
    tensorboard: bool = False  # also write the log to TensorBoard event files in output_dir
    wandb: str = ""  # also log to this Weights & Biases project; "" = off (WANDB_MODE=offline)
    max_nonfinite: int = 5  # abort after this many non-finite losses in a row
    stop_at_iter: int = 0  # stop (with a checkpoint) after this global iteration; 0 = never
    compile: str = "auto"  # auto (compiled on CUDA, eager on the CPU) | true | false: per block
    cuda_graphs: bool = False  # CUDA, fast path: replay the compiled blocks as CUDA graphs
    device: str = "auto"  # auto | cpu | cuda
    parallel: str = "ddp"  # several processes: ddp (whole copies) | fsdp (FSDP2: sharded)
    fsdp_reshard_after_forward: bool = True  # fsdp: regather weights in backward (ZeRO-3)
    fsdp_shard_size: int = 0  # fsdp: shard within groups of N processes (HSDP); 0 = all


@dataclass
class EvalConfig:
    knn_k: Tuple[int, ...] = (10, 20, 100, 200)  # neighbours
    knn_temp: float = 0.07  # vote weight exp(sim / T)
    knn_every: int = 0  # k-NN on the held-out split every N epochs during training; 0 = off
    batch_size: int = 256  # feature extraction batch
    precision: str = "fp32"  # feature extraction: fp32 (official) | bf16 (autocast: faster)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# Paper recipes (docs/design.md §1.5) as small diffs on the defaults. The paper's global batch
# of 1024 is 8 processes x 128 (or 16 x 64); lr is scaled by the actual global batch.
_PAPER = {
    "loss.teacher_temp": 0.07,
    "model.norm_last_layer": False,
    "model.shared_head": True,
    "model.out_dim": 8192,
    "model.patch_out_dim": 8192,
    "data.n_local": 10,
    "data.global_scale": (0.25, 1.0),
    "data.local_scale": (0.05, 0.25),
    "data.source": "folder",
    "train.batch_size": 128,
    "train.impl": "fast",
}
# Flat parameter buffers: the AdamW step and the teacher EMA in one pass (the same
# arithmetic up to rounding, measured no slower on an H100). Not for the ViT-L preset:
# its FSDP shards parameters, which flat buffers cannot view.
_FLAT = {"optim.fuse_ema": True}

# The DINOv2-style variant of a paper preset: every option of the benchmark's fastest row,
# including those that change what is computed (a fixed masked-token count per batch, the
# patch center from masked tokens only) or its rounding (LayerNorms in bf16). A user picks
# these semantics by name; the paper presets keep the official ones.
DINOV2_STYLE = {
    "masks.sampler": "stratified",
    "loss.center2_from": "masked",
    "model.pack_crops": True,
    "model.efficient_drop_path": True,
    "model.layernorm_fp32": False,
}

PRESETS = {
    # CPU, embedded digits (32 px renders of sklearn's 8x8 digits), ~4 min on 2 cores.
    # 8 px patches (a 4x4 grid) and no local crops (a 16 px local crop of a digit is a
    # stroke, not a digit) make an epoch ~5 s, so 48 epochs fit, and the k-NN gain grows
    # with epochs. The CLS term goes uniform here, as in the official code; the patch term
    # and the k-NN carry the learning (docs/demo.md: why, and the recipes tried).
    "demo": {
        "model.arch": "vit_demo",
        "model.patch_size": 8,
        "model.drop_path_rate": 0.1,
        "model.out_dim": 1024,
        "model.patch_out_dim": 1024,
        "model.head_hidden_dim": 512,
        "model.head_bottleneck_dim": 128,
        "model.norm_last_layer": False,
        "data.source": "digits",
        "data.global_size": 32,
        "data.local_size": 16,
        "data.n_local": 0,
        "data.global_scale": (0.25, 1.0),
        "data.local_scale": (0.05, 0.25),
        "data.num_workers": 2,
        "loss.teacher_temp": 0.04,
        "loss.warmup_teacher_temp": 0.04,
        "loss.warmup_teacher_temp_epochs": 5,
        "optim.lr": 2e-3,
        "optim.warmup_epochs": 2,
        "optim.momentum_teacher": 0.99,
        "train.epochs": 48,
        "train.batch_size": 32,
        "train.impl": "fast",
        "train.output_dir": "runs/demo",
        "train.log_every": 5,
    },
    "vit_small_16_paper": {**_PAPER, **_FLAT, "model.arch": "vit_small", "train.epochs": 800},
    "vit_base_16_paper": {**_PAPER, **_FLAT, "model.arch": "vit_base", "train.epochs": 400},
    "vit_large_16_paper": {**_PAPER, "model.arch": "vit_large", "train.epochs": 250,
                           "train.batch_size": 64,
                           # ZeRO-2, as DINOv2's SHARD_GRAD_OP (one process: not sharded)
                           "train.parallel": "fsdp",
                           "train.fsdp_reshard_after_forward": False},
}
for _name in ("vit_small_16", "vit_base_16", "vit_large_16"):
    PRESETS[f"{_name}_dinov2style"] = {**PRESETS[f"{_name}_paper"], **DINOV2_STYLE}


def all_keys(cfg: Config = None):
    """Every dotted key of the tree, in declaration order."""
    cfg = cfg or Config()
    return [f"{s.name}.{f.name}" for s in dataclasses.fields(cfg)
            for f in dataclasses.fields(getattr(cfg, s.name))]


def _unknown_key(key: str) -> UserError:
    close = difflib.get_close_matches(key, all_keys(), n=3)
    hint = f"; did you mean {' or '.join(close)}?" if close else "; `ibot-fast keys` lists them"
    return UserError(f"unknown config key '{key}'{hint}")


def _parse_value(text: str, default):
    """Parse a command-line value to the type of the key's default."""
    if isinstance(default, bool):
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true/false, got '{text}'")
    if isinstance(default, tuple):
        parts = [p for p in text.strip().strip("[]()").replace(",", " ").split() if p]
        kind = type(default[0]) if default else float
        return tuple(kind(p) for p in parts)
    if isinstance(default, int):
        return int(text)
    if isinstance(default, float):
        return float(text)
    return text


# Keys that take auto | true | false (written as strings; older checkpoints hold a bool).
_AUTO_OR_BOOL = {"train.compile"}


def _auto_or_bool(key: str, value) -> str:
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return "true"
    if text in ("0", "false", "no", "off"):
        return "false"
    if text == "auto":
        return text
    raise UserError(f"bad value for {key}: expected auto, true or false, got '{value}'")


def set_key(cfg: Config, key: str, value) -> None:
    """Set one dotted key; strings are parsed to the default's type."""
    section, _, name = key.partition(".")
    sub = getattr(cfg, section, None)
    if sub is None or not dataclasses.is_dataclass(sub) or name not in {
            f.name for f in dataclasses.fields(sub)}:
        raise _unknown_key(key)
    default = getattr(sub, name)
    if key in _AUTO_OR_BOOL:
        value = _auto_or_bool(key, value)
    elif isinstance(value, str) and not isinstance(default, str):
        try:
            value = _parse_value(value, default)
        except ValueError as e:
            raise UserError(f"bad value for {key}: {e}") from None
    if isinstance(default, tuple):
        value = tuple(value)
    setattr(sub, name, value)


def apply_overrides(cfg: Config, overrides) -> Config:
    """Apply `key=value` strings (or a dict) in order."""
    items = overrides.items() if isinstance(overrides, dict) else overrides
    for item in items:
        if isinstance(item, str):
            if "=" not in item:
                raise UserError(f"override '{item}' is not of the form key=value")
            key, value = item.split("=", 1)
        else:
            key, value = item
        set_key(cfg, key.strip(), value)
    return cfg


def build_config(preset: str = None, overrides=(), config_file=None,
                 need_data: bool = True) -> Config:
    """Defaults, then the preset's diff, then the YAML file's keys, then the overrides;
    validated (`need_data=False`: a folder source may lack its path, as in a file of
    keys to fill in)."""
    cfg = Config()
    if preset:
        if preset not in PRESETS:
            raise UserError(f"unknown preset '{preset}'; choose one of: {', '.join(PRESETS)}")
        apply_overrides(cfg, PRESETS[preset])
    if config_file:
        apply_overrides(cfg, load_yaml(config_file))
    apply_overrides(cfg, overrides)
    validate(cfg, need_data)
    return cfg


# -- YAML files: `ibot-fast keys --yaml` writes them, `--config` reads them -----------------

# YAML 1.2's floats with an exponent and no dot or sign (1e-4, 1.0e5), which PyYAML's
# YAML 1.1 resolver reads as strings: the loader reads them as floats and the dumper
# quotes strings that look like them.
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


@functools.lru_cache(maxsize=None)
def _yaml_classes():
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    class Dumper(yaml.SafeDumper):
        pass

    for cls in (Loader, Dumper):
        cls.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT,
                                  list("-+0123456789."))
    return Loader, Dumper


@functools.lru_cache(maxsize=None)
def key_comments() -> dict:
    """{dotted key: the comment beside its field in this file}. Read from the source with
    `tokenize`, so that the dataclasses stay a plain table; {} where the source is not
    installed (the YAML then has no comments)."""
    comments = {}
    for section in dataclasses.fields(Config):
        cls = section.default_factory
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            return {}
        statement = None  # the first name of the current logical line
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
                statement = None
            elif tok.type == tokenize.NAME and statement is None:
                statement = tok.string
            elif tok.type == tokenize.COMMENT and statement in names:
                key = f"{section.name}.{statement}"
                text = tok.string.lstrip("#").strip()
                comments[key] = f"{comments[key]} {text}" if key in comments else text
    return comments


def _yaml_value(value) -> str:
    """One value in YAML's flow style, on one line (tuples as lists)."""
    import yaml

    _, dumper = _yaml_classes()
    value = list(value) if isinstance(value, tuple) else value
    text = yaml.dump([value], Dumper=dumper, default_flow_style=True, width=float("inf"))
    return text.strip()[1:-1]  # without the list around it


def to_yaml(cfg: Config, header=()) -> str:
    """Every key of `cfg` as a YAML file, nested by section, each with its comment from
    this file; `header` lines come first, as comments. `load_yaml` reads it back to the
    same config."""
    comments = key_comments()
    lines = [f"# {line}".rstrip() for line in header]
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        entries = [(f"{f.name}: {_yaml_value(getattr(sub, f.name))}",
                    comments.get(f"{section.name}.{f.name}"))
                   for f in dataclasses.fields(sub)]
        width = min(max(len(entry) for entry, _ in entries), 40)
        lines += ["", f"{section.name}:"]
        lines += [f"  {entry.ljust(width)}  # {comment}" if comment else f"  {entry}"
                  for entry, comment in entries]
    return "\n".join(lines).lstrip("\n") + "\n"


def _typed(value, default):
    """`value` (read from YAML) as the type of the key's `default`; ValueError saying
    what was expected when it is of another type."""
    def number(v, kind):
        return not isinstance(v, bool) and isinstance(v, (int, float) if kind is float else kind)

    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError("true or false")
    elif isinstance(default, (int, float)):
        kind = type(default)
        if not number(value, kind):
            raise ValueError("an integer" if kind is int else "a number")
        value = kind(value)
    elif isinstance(default, tuple):
        kind = type(default[0]) if default else float
        if not isinstance(value, list) or not all(number(v, kind) for v in value):
            raise ValueError(f"a list of {'integers' if kind is int else 'numbers'}, "
                             f"e.g. {_yaml_value(default)}")
        value = tuple(kind(v) for v in value)
    elif not isinstance(value, str):
        raise ValueError("a string")
    return value


def load_yaml(path) -> dict:
    """{dotted key: value} from a YAML config file: sections nested as `ibot-fast keys`
    names the keys, any subset of them. An unknown key, or a value of the wrong type, is
    a one-line error that names the key and the file."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot read config file {path}: {e.strerror or e}") from None
    try:
        tree = yaml.load(text, Loader=_yaml_classes()[0])
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{path} is not valid YAML{where}: {problem}") from None
    if tree is None:  # an empty file
        return {}
    defaults = Config()
    sections = [s.name for s in dataclasses.fields(defaults)]
    if not isinstance(tree, dict):
        raise UserError(f"{path}: expected sections ({', '.join(sections)}) at the top, "
                        f"got {_yaml_value(tree)}")
    values = {}
    for section, keys in tree.items():
        section = str(section)
        if section not in sections:
            if "." in section and section in all_keys(defaults):
                head, _, name = section.partition(".")
                raise UserError(f"{path}: write {section} nested, as '{name}:' under "
                                f"'{head}:' (ibot-fast keys --yaml shows the layout)")
            close = difflib.get_close_matches(section, sections, n=1)
            hint = f"did you mean {close[0]}?" if close else f"the sections are " \
                f"{', '.join(sections)}"
            raise UserError(f"{path}: unknown config section '{section}'; {hint}")
        if keys is None:  # a section left empty
            continue
        if not isinstance(keys, dict):
            raise UserError(f"{path}: section '{section}' must hold keys (name: value), "
                            f"got {_yaml_value(keys)}")
        for name, value in keys.items():
            key = f"{section}.{name}"
            if key not in all_keys(defaults):
                raise UserError(f"{path}: {_unknown_key(key)}")
            try:
                if key in _AUTO_OR_BOOL:  # auto | true | false: a YAML bool or a string
                    if not isinstance(value, (bool, str)):
                        raise ValueError("auto, true or false")
                    values[key] = value
                else:
                    values[key] = _typed(value, get_key(defaults, key))
            except ValueError as e:
                raise UserError(f"{path}: {key} must be {e}, got {value!r}") from None
    return values


def _choices() -> dict:
    """The values each key with a fixed set of them takes: from the constants of the code
    that reads them where it has one (imported here, not restated), else listed here."""
    from .data import PIPELINES
    from .data.datasets import SOURCES
    from .loss import CENTER2_FROM, CENTERINGS
    from .masking import SAMPLERS, SHAPES
    from .models.attention import BACKENDS
    from .models.vit import ARCHS, CHECKPOINTING
    from .optim import CLIP_MODES, OPTIMIZERS

    return {
        "model.arch": tuple(ARCHS),
        "model.attention": ("auto",) + BACKENDS,
        "model.activation_checkpointing": CHECKPOINTING,
        "model.init_which": ("teacher", "student"),
        "data.source": SOURCES,
        "data.pipeline": PIPELINES,
        "masks.sampler": SAMPLERS,
        "masks.pred_shape": SHAPES,
        "loss.center2_from": CENTER2_FROM,
        "loss.centering": CENTERINGS,
        "optim.name": OPTIMIZERS,
        "optim.clip_mode": CLIP_MODES,
        "train.compile": ("auto", "true", "false"),
        "train.impl": ("reference", "fast"),
        "train.precision": ("auto", "fp32", "bf16", "fp16"),
        "train.device": ("auto", "cpu", "cuda"),
        "train.parallel": ("ddp", "fsdp"),
        "eval.precision": ("fp32", "bf16"),
    }


def get_key(cfg: Config, key: str):
    section, _, name = key.partition(".")
    return getattr(getattr(cfg, section), name)


def validate(cfg: Config, need_data: bool = True) -> None:
    """One-line errors for values that cannot work (`need_data=False`: but for a
    folder source's missing path)."""
    for key, choices in _choices().items():
        if get_key(cfg, key) not in choices:
            raise UserError(f"{key}={get_key(cfg, key)!r} is not one of {', '.join(choices)}")
    for size_key in ("data.global_size", "data.local_size"):
        if get_key(cfg, size_key) % cfg.model.patch_size:
            raise UserError(f"{size_key}={get_key(cfg, size_key)} is not a multiple of "
                            f"model.patch_size={cfg.model.patch_size}")
    if len(cfg.masks.pred_ratio) != len(cfg.masks.pred_ratio_var):
        raise UserError("masks.pred_ratio and masks.pred_ratio_var need the same length")
    for r, v in zip(cfg.masks.pred_ratio, cfg.masks.pred_ratio_var):
        if not 0 <= r - v <= r + v <= 1:
            raise UserError(f"mask ratio {r} +- {v} leaves [0, 1]")
    if need_data and cfg.data.source in ("folder", "webdataset") and not cfg.data.path:
        raise UserError(f"data.source={cfg.data.source} needs a path: pass --data PATH (an "
                        "ImageFolder tree, or webdataset .tar shards)")
    if cfg.loss.fused_last_layer and cfg.loss.centering != "center":
        raise UserError("loss.fused_last_layer=true computes the teacher logits on chip and "
                        "needs loss.centering=center")
    if not cfg.loss.koleo_weight >= 0:  # NaN too
        raise UserError("loss.koleo_weight must be >= 0 (DINOv2 uses 0.1; 0 turns it off)")
    if cfg.loss.koleo_weight > 0 and cfg.train.batch_size < 2:
        raise UserError("loss.koleo_weight > 0 needs train.batch_size >= 2 (each image's "
                        "nearest neighbour in the batch)")
    if cfg.train.fsdp_shard_size < 0:
        raise UserError("train.fsdp_shard_size must be >= 0 (0: shard over all processes)")
    if cfg.train.fsdp_shard_size and cfg.train.parallel != "fsdp":
        raise UserError("train.fsdp_shard_size is for train.parallel=fsdp (HSDP); add "
                        "train.parallel=fsdp or drop the key")
    if cfg.train.save_every < 1 or cfg.train.save_every_iters < 0 or cfg.train.keep_every < 0:
        raise UserError("train.save_every must be >= 1, train.save_every_iters and "
                        "train.keep_every >= 0 (0: off)")
    if cfg.data.n_local < 0 or cfg.train.batch_size < 1 or cfg.train.epochs < 1:
        raise UserError("data.n_local must be >= 0, train.batch_size and train.epochs >= 1")


def derived(cfg: Config, world_size: int = 1) -> dict:
    """Values computed from the config: the one place where lr scaling happens."""
    global_batch = cfg.train.batch_size * world_size
    grid = cfg.data.global_size // cfg.model.patch_size
    local_grid = cfg.data.local_size // cfg.model.patch_size
    return {
        "world_size": world_size,
        "global_batch": global_batch,
        "lr": cfg.optim.lr * global_batch / 256.0,
        "grid": (grid, grid),
        "n_patches": grid * grid,
        "n_local_patches": local_grid * local_grid,
    }


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


# Keys that earlier versions had and wrote into their checkpoints: skipped when a
# checkpoint's config is read, so that its weights still load.
REMOVED_KEYS = frozenset({
    "masks.max_masked_fraction",  # never read: the i.i.d. buffer bound is masking.buffer_rows
})


def from_dict(d: dict) -> Config:
    """Rebuild a Config from `to_dict` output (e.g. a checkpoint); unknown keys are errors,
    but for those an earlier version had (`REMOVED_KEYS`)."""
    cfg = Config()
    for section, values in d.items():
        for name, value in values.items():
            if f"{section}.{name}" in REMOVED_KEYS:
                continue
            set_key(cfg, f"{section}.{name}", tuple(value) if isinstance(value, list) else value)
    return cfg


def dumps(cfg: Config) -> str:
    return json.dumps(to_dict(cfg), indent=2)
