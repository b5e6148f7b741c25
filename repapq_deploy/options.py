"""What a user decides about a build: :class:`BuildOptions` (the recipe holds the expert settings)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from repapq_deploy.errors import ConfigError
from repapq_deploy.recipe import Recipe


@dataclass
class BuildOptions:
    """What a user decides about a build; expert settings are in ``recipe`` (recorded in the report)."""

    model: str
    arch: str | None = None
    num_classes: int | None = None
    in_chans: int | None = None
    calib: str = "calib"
    calib_count: int | None = 256
    eval: str | None = None
    bits: int = 8
    first_last_bits: int = 8
    method: str = "auto"
    profile: str | None = None
    backend: str = "auto"
    out: str | None = None  # default: engines/<model file stem>
    seed: int = 0
    device: str = "cpu"
    input_size: tuple[int, int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    threads: int | None = None  # CPU threads (PyTorch and ONNX Runtime); None: all cores
    # accuracy budget: top-1 drop against FP32 in pp (with labelled eval data), else 100 - agreement %
    max_drop: float | None = None
    trust_pickle: bool = False
    force: bool = False
    recipe: Recipe = field(default_factory=Recipe)
    # TensorRT builder
    trt_batch: tuple[int, int, int] = (1, 8, 32)
    workspace_mib: int = 4096
    builder_opt_level: int = 3
    hardware_compatible: bool = False
    version_compatible: bool = False

    @classmethod
    def from_flat(cls, **settings) -> BuildOptions:
        """Options from one flat mapping of build options and recipe keys (e.g. ``offset_relu="all"``)."""
        own = {f.name for f in fields(cls)}
        unknown = set(settings) - own - {f.name for f in fields(Recipe)}
        if unknown:
            raise ConfigError(f"unknown build setting '{sorted(unknown)[0]}'")
        recipe = settings.pop("recipe", None) or Recipe()
        changes = {k: settings.pop(k) for k in list(settings) if k not in own}
        return cls(**settings, recipe=recipe.replace(**changes) if changes else recipe)

    def to_dict(self) -> dict:
        return {**asdict(self), "recipe": self.recipe.to_dict()}
