"""Training configuration: YAML files merged over typed defaults (OmegaConf), plus ``key=value``
command-line overrides. Unknown keys are an error naming the key.

Learning rate: with ``optim.scale_lr: true`` (taming's rule) the rate used is
``base_lr * batch_size * grad_accum * world_size``; otherwise ``base_lr`` itself.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

DEFAULTS: dict = {
    "name": "run",
    "run_dir": None,  # default: runs/<name>
    "seed": 0,
    "device": "auto",  # auto | cpu | cuda | cuda:<i>
    "model": {
        # taming's f16 VQGAN (configs/ade20k.yaml of the released code)
        "ch": 128,
        "ch_mult": [1, 1, 2, 2, 4],
        "num_res_blocks": 2,
        "attn_resolutions": [16],
        "z_channels": 256,
        "resolution": 256,
        "in_channels": 3,
        "out_ch": 3,
        "dropout": 0.0,
        "norm_groups": 32,
        "zero_init_residual": False,  # True: residual branches start at zero (fast small-model training)
        "embed_dim": 256,
        "quantizer": {
            "num_codes": 1024,
            "partitions": 4,
            "partition": "group",
            "shared_codebook": True,
            "scale": 1.0,
            "beta": 0.25,
            "legacy": True,
            "kepler_kl_weight": 0.0,
            "kl_prior": "grid",
            "kl_prior_seed": None,  # None: torch.initial_seed(), i.e. the run's seed
            "packing_weight": 0.0,
            "packing_t": 1.0,
            "init": "uniform",
            "ema_decay": None,
            "dead_code_threshold": 0,
            "dead_code_window": 1,
            "backend": None,
        },
    },
    "loss": {
        "codebook_weight": 1.0,
        "pixel_weight": 1.0,
        "perceptual_weight": 1.0,
        "lpips_vgg_path": None,  # default: <torch hub dir>/checkpoints/vgg16-397923af.pth
        "lpips_lin_path": None,  # default: <torch hub dir>/checkpoints/lpips_vgg_v0.1.pth
        "disc_start": 10000,
        "disc_weight": 0.8,
        "disc_factor": 1.0,
        "disc_num_layers": 3,
        "disc_ndf": 64,
        "disc_loss": "hinge",
    },
    "data": {
        "train": "sample",  # sample | faces | a folder of images | a list file
        "val": "sample",
        "size": 256,
        "resize": None,  # shorter side before cropping; default size (2 * size for "sample")
        "random_crop": True,
        "flip": True,
        "batch_size": 5,
        "num_workers": 0,
        "samples_per_epoch": 1024,  # length of an epoch of the embedded "sample" set
        "val_batch_size": 16,
        "val_max_images": None,
    },
    "optim": {
        "name": "adam",  # adam | adamw
        "base_lr": 4.5e-6,
        "scale_lr": True,
        "betas": [0.5, 0.9],
        "weight_decay": 0.0,
        "warmup_steps": 0,
        "schedule": "constant",  # constant | cosine (to min_lr_ratio * lr at max_steps)
        "min_lr_ratio": 0.0,
        "grad_clip": 0.0,  # max global grad norm; 0 = off
        "grad_accum": 1,
    },
    "train": {
        "max_steps": 1000,
        "time_limit_minutes": None,  # stop (then evaluate and save) after this much training time
        "precision": "auto",  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
        "eval_every": 500,
        "ckpt_every": 500,
        "log_every": 10,
        "grid_images": 8,
        "progress": True,
        "threads": None,  # torch.set_num_threads on CPU; None = torch's default
    },
}


def _schema() -> DictConfig:
    schema = OmegaConf.create(DEFAULTS)
    OmegaConf.set_struct(schema, True)
    return schema


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> DictConfig:
    """Defaults, merged with the YAML file at ``path`` (None: defaults only), then with ``overrides``
    (``"optim.base_lr=1e-4"`` dotlist strings). Raises ValueError naming an unknown key or a bad
    override, FileNotFoundError for a missing file."""
    cfg = _schema()
    layers = []
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file {path} does not exist")
        layers.append((str(path), OmegaConf.load(path)))
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
    if overrides:
        layers.append(("overrides", OmegaConf.from_dotlist(list(overrides))))
    for source, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except ConfigKeyError as exc:
            raise ValueError(f"unknown config key {exc.full_key!r} in {source}") from None
        except OmegaConfBaseException as exc:
            raise ValueError(f"bad config value in {source}: {exc.msg}") from None
    _check_types(cfg, DEFAULTS, "")
    return cfg


def _check_types(cfg: DictConfig, defaults: dict, prefix: str) -> None:
    """Numbers and booleans in the defaults must stay numbers and booleans (bools are not numbers here)."""
    for key, default in defaults.items():
        value = cfg[key]
        name = f"{prefix}{key}"
        if isinstance(default, dict):
            _check_types(value, default, name + ".")
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"config key {name!r} must be true or false, got {value!r}")
        elif isinstance(default, (int, float)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"config key {name!r} must be a number, got {value!r}")


def to_dict(cfg: DictConfig) -> dict:
    """Plain, resolved Python containers (what checkpoints store and models are built from)."""
    return OmegaConf.to_container(cfg, resolve=True)
