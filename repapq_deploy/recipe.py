"""Recipes: the expert settings of a build, in one typed object that a YAML or JSON file can hold.

A deployment user chooses the model, data, bit width, method and backend; everything else a build
does has a measured default (docs/method.md) and lives here. A recipe file names only the keys it
changes; named recipes ship with the package (``repapq_deploy/recipes/*.yaml``)::

    # my.yaml
    preset: fast
    offset_relu: all
    reconstruction: {lr_weight: 0.0}

Defaults are written once, in :class:`Recipe`'s fields.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from repapq_deploy.artifacts import write_text
from repapq_deploy.errors import ConfigError, InputError

RECIPES_DIR = Path(__file__).parent / "recipes"
EQUALIZE = ("auto", "none", "depthwise", "all")
OFFSET_RELU = ("auto", "none", "unpadded", "all")
VIEWS = ("hflip", "shift", "mixup")


@dataclass(frozen=True)
class Recipe:
    """Expert settings of a build (every field has a measured default; see docs/method.md).

    Calibration:
      preset: reconstruction effort (repapq, brecq): fast | default | thorough (200 / 1000 / 3000
        iterations per unit).
      holdout: the fraction of the calibration images held out (seeded, never fitted) to validate the
        method on; 0 fits every image and validates nothing.
      time_budget: seconds the reconstruction candidate of method auto may take, estimated on this
        machine before it runs (over it: preset fast, else the range methods only).
      equalize: cross-layer equalization before calibration: auto | none | depthwise | all (auto:
        all for reconstruction; for a range method the mode closest to FP32 on the calibration images).
      split_identity: keep a fused kernel's dominant identity tap as a depthwise 1x1 conv beside it
        where that at least halves the conv's quantization error on the calibration images.
      offset_relu: TensorRT profile, 8-bit: post-ReLU tensors stored as x - 128 s to use all 256
        levels: auto (unpadded on tensorrt) | none | unpadded | all.
      add_bits: bits of tensors quantized only because an integer Add needs them (6 or 8).
      adaround, qdrop, gptq, calib_augment: a reconstruction method's weight rounding (AdaRound),
        QDrop probability, GPTQ rounding and extra views of the calibration images (hflip, shift,
        mixup); None keeps the method's own setting.
      reconstruction: further fields of the reconstruction settings
        (``calibrate.reconstruct.ReconSettings``: iters, lr_affine, lr_scale, lr_weight, loss, ...),
        applied after the preset.
      batch_size: calibration batch size.
    Data, export and verification:
      resize: resize the shorter image side to this before the centre crop (default: timm's crop_pct).
      eval_count: evaluate on this many samples (default: all).
      opset: ONNX opset of the exported graphs (13 or newer).
      bench_seconds: time budget of each latency measurement in verify.
    """

    preset: str = "default"
    holdout: float = 0.2
    time_budget: float = 900.0
    equalize: str = "auto"
    split_identity: bool = True
    offset_relu: str = "auto"
    add_bits: int = 8
    adaround: bool | None = None
    qdrop: float | None = None
    gptq: bool | None = None
    calib_augment: tuple[str, ...] | None = None
    reconstruction: dict = field(default_factory=dict)
    batch_size: int = 32
    resize: int | None = None
    eval_count: int | None = None
    opset: int = 17
    bench_seconds: float = 3.0

    def __post_init__(self) -> None:
        if isinstance(self.calib_augment, list):
            object.__setattr__(self, "calib_augment", tuple(self.calib_augment))
        _validate(self, "recipe")

    # --- the settings calibration takes ----------------------------------------------------------------

    def reconstruction_overrides(self) -> dict:
        """Fields of the reconstruction settings this recipe changes from the method's own."""
        named = {"adaround": self.adaround, "qdrop": self.qdrop, "gptq": self.gptq, "augment": self.calib_augment}
        return {**{k: v for k, v in named.items() if v is not None}, **self.reconstruction}

    # --- files --------------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict, source: str = "recipe") -> Recipe:
        """A recipe from ``data``; an unknown key or a bad value is a ConfigError naming the key."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of recipe keys, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown key '{unknown[0]}'; recipe keys are {', '.join(sorted(known))}")
        hints = typing.get_type_hints(cls)
        for key, value in data.items():
            error = _type_error(key, value, hints[key])
            if error:
                raise ConfigError(f"{source}: {error}")
        try:
            return cls(**data)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, name_or_path: str | Path) -> Recipe:
        """A shipped recipe by name (``fast``, ``thorough``, ...) or a ``.yaml``/``.yml``/``.json`` file."""
        path = Path(name_or_path)
        if path.suffix == "" and len(path.parts) == 1:
            shipped = RECIPES_DIR / f"{path.name}.yaml"
            if not shipped.is_file():
                raise ConfigError(f"`recipe` {name_or_path}: no such named recipe; named recipes are "
                                  f"{', '.join(named_recipes())}, or pass a .yaml/.json file")
            path = shipped
        if not path.is_file():
            raise InputError(f"`recipe` {path}: not found; pass a .yaml/.json file or one of "
                             f"{', '.join(named_recipes())}")
        try:
            text = path.read_text()
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"`recipe` {path}: not readable as {'JSON' if path.suffix == '.json' else 'YAML'} "
                             f"({reason}); fix the file") from None
        return cls.from_dict(data or {}, f"recipe {path}")

    def to_dict(self, changed_only: bool = False) -> dict:
        """Plain data (lists for tuples); with ``changed_only``, only the keys that differ from the defaults."""
        default = Recipe()
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if changed_only and value == getattr(default, f.name):
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def save(self, path: str | Path) -> None:
        """Write the keys that differ from the defaults as YAML (or JSON for a ``.json`` path), atomically."""
        path = Path(path)
        data = self.to_dict(changed_only=True)
        text = json.dumps(data, indent=2) + "\n" if path.suffix == ".json" else yaml.safe_dump(data, sort_keys=False)
        write_text(path, text)

    def replace(self, **changes) -> Recipe:
        """A copy with ``changes`` applied (validated as from a file)."""
        return Recipe.from_dict({**self.to_dict(), **changes}, "recipe")


def named_recipes() -> list[str]:
    """The names of the recipes that ship with the package."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def _type_error(key: str, value: object, hint: object) -> str | None:
    """Why ``value`` does not fit the type ``hint`` of recipe key ``key`` (None when it fits)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    allowed = args if origin in (typing.Union, types.UnionType) else (hint,)
    for a in allowed:
        base = typing.get_origin(a) or a
        if a is type(None) and value is None:
            return None
        if base is tuple and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return None
        if base in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool) \
                and (base is float or isinstance(value, int)):
            return None
        if base in (bool, str, dict) and isinstance(value, base):
            return None
    names = " or ".join("null" if a is type(None) else getattr(typing.get_origin(a) or a, "__name__", str(a))
                        for a in allowed)
    return f"key '{key}': {value!r} is not of type {names}"


def _validate(r: Recipe, source: str) -> None:
    from repapq_deploy.calibrate.reconstruct import PRESETS

    choices = {"preset": tuple(PRESETS), "equalize": EQUALIZE, "offset_relu": OFFSET_RELU}
    for key, allowed in choices.items():
        if getattr(r, key) not in allowed:
            raise ConfigError(f"key '{key}': {getattr(r, key)!r} is not one of {', '.join(allowed)}")
    if r.add_bits not in (6, 8):
        raise ConfigError(f"key 'add_bits': {r.add_bits!r} is not 6 or 8")
    if r.qdrop is not None and not 0 <= r.qdrop <= 1:
        raise ConfigError(f"key 'qdrop': {r.qdrop!r} is not a probability in [0, 1]")
    if r.calib_augment is not None:
        bad = [v for v in r.calib_augment if v not in VIEWS]
        if bad:
            raise ConfigError(f"key 'calib_augment': {bad[0]!r} is not one of {', '.join(VIEWS)}")
    for key, least in (("batch_size", 1), ("opset", 13), ("resize", 1), ("eval_count", 1)):
        value = getattr(r, key)
        if value is not None and value < least:
            raise ConfigError(f"key '{key}': {value!r} must be at least {least}")
    if not 0 <= r.holdout < 0.5:
        raise ConfigError(f"key 'holdout': {r.holdout!r} is not a fraction in [0, 0.5)")
    if r.time_budget < 0:
        raise ConfigError(f"key 'time_budget': {r.time_budget!r} must be at least 0")
    if r.bench_seconds <= 0:
        raise ConfigError(f"key 'bench_seconds': {r.bench_seconds!r} must be positive")
    _check_reconstruction(r.reconstruction)


def _check_reconstruction(values: dict) -> None:
    from repapq_deploy.calibrate.reconstruct import ReconSettings

    settings = {f.name: f for f in dataclasses.fields(ReconSettings) if f.name != "name"}
    hints = typing.get_type_hints(ReconSettings)
    for key, value in values.items():
        if key not in settings:
            raise ConfigError(f"key 'reconstruction': unknown setting '{key}'; settings are "
                              f"{', '.join(sorted(settings))}")
        error = _type_error(f"reconstruction.{key}", value, hints[key])
        if error:
            raise ConfigError(error)
