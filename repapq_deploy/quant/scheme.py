"""Backend profiles and the integer formats they fix (see DESIGN.md, "Backends")."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from repapq_deploy.errors import ConfigError


@dataclass(frozen=True)
class IntFormat:
    """The integer grid one tensor is quantized to. Storage is always 8-bit (INT6 is emulated)."""

    bits: int
    signed: bool
    narrow: bool = False
    # an unsigned grid kept in int8 storage. Below 8 bits it fits as it is, [0, 2^bits - 1] within
    # [-128, 127]: TensorRT has no uint8, but a 6-bit post-ReLU tensor still gets all 64 levels
    # (DESIGN.md's Clip(x, 0, 63 s) before an int8 QuantizeLinear). At 8 bits [0, 255] is stored
    # shifted by -128 (see ``offset``): the tensor is exported as ``x - 128 s`` and the layers that
    # read it add the constant back through their bias.
    int8_storage: bool = False

    def __post_init__(self) -> None:
        if self.int8_storage and (self.signed or self.bits > 8):
            raise ValueError("int8 storage of an unsigned grid needs at most 8 bits")

    @property
    def storage_signed(self) -> bool:
        """Whether the exported Q/DQ type is int8 (else uint8)."""
        return self.signed or self.int8_storage

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.narrow else 0)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def offset(self) -> int:
        """The integer subtracted before storage: 128 for [0, 255] in int8, else 0."""
        return 2 ** (self.bits - 1) if self.int8_storage and self.bits == 8 else 0

    @property
    def emulated(self) -> bool:
        """True when the grid is narrower than the 8-bit storage type, so a Clip must enforce it."""
        return self.bits < 8


@dataclass(frozen=True)
class Profile:
    """A backend's quantization scheme: what is calibrated is exactly what the backend runs."""

    name: str
    unsigned_nonnegative: bool  # uint8 (zero point 0) for post-ReLU tensors
    add_quantizes_both_inputs: bool  # ORT's QLinearAdd wants both; TensorRT only the shortcut
    int32_bias: bool  # ORT fuses Gemm into QGemm only with an int32 bias; TensorRT keeps float biases
    integer_clip: bool  # INT6 range enforced on the integer tensor (ORT) or by a float Clip before Q (TensorRT)
    # Signed activations stored as uint8 with zero point 128: the same grid as symmetric int8, but
    # ORT's QLinearConv needs input and output of one type, so a conv from a post-ReLU (uint8) tensor
    # to a signed one (a linear-bottleneck projection) or back only fuses when both are uint8.
    signed_as_uint8: bool = False
    # Non-negative tensors below 8 bits use the unsigned grid inside int8 storage (see IntFormat); at
    # 8 bits [0, 255] does not fit int8, so TensorRT's post-ReLU tensors keep 7 of their 8 bits unless
    # they are offset (``offset=True`` below, QuantConfig.offset_relu).
    unsigned_in_int8: bool = False

    def weight_format(self, bits: int) -> IntFormat:
        # Both backends: symmetric per-channel, narrow range [-(2^(b-1)-1), 2^(b-1)-1].
        return IntFormat(bits, signed=True, narrow=True)

    def activation_format(self, bits: int, nonnegative: bool, offset: bool = False) -> IntFormat:
        """The grid of a per-tensor activation quantizer. ``offset`` allows the shifted 8-bit unsigned
        grid in int8 storage (only where the readers can take the constant back, see placement)."""
        if nonnegative and self.unsigned_nonnegative:
            return IntFormat(bits, signed=False)
        if nonnegative and self.unsigned_in_int8 and (bits < 8 or offset):
            return IntFormat(bits, signed=False, int8_storage=True)
        return IntFormat(bits, signed=True)


PROFILES: dict[str, Profile] = {
    "tensorrt": Profile("tensorrt", unsigned_nonnegative=False, add_quantizes_both_inputs=False,
                        int32_bias=False, integer_clip=False, unsigned_in_int8=True),
    "onnxruntime": Profile("onnxruntime", unsigned_nonnegative=True, add_quantizes_both_inputs=True,
                           int32_bias=True, integer_clip=True, signed_as_uint8=True),
}


# "unpadded": tensors read only by linear layers and by convs without zero padding (the constant
# folds into their bias exactly); "all": also convs with zero padding, which get a constant border
# map added to their output (the padded zeros would otherwise read as -128 s)
OFFSET_RELU_MODES = ("none", "unpadded", "all")
# what `offset_relu` auto (the default) means per profile: ONNX Runtime stores post-ReLU tensors as uint8
# already; on TensorRT, "unpadded" needs no op beyond the canonical Conv -> Q / DQ -> Conv, where "all"
# adds a border map after every padded reader (docs/method.md)
OFFSET_RELU_AUTO = {"tensorrt": "unpadded", "onnxruntime": "none"}


def resolve_offset_relu(mode: str, profile: str) -> str:
    """``offset_relu`` as a QuantConfig takes it: ``auto`` becomes the profile's choice
    (:data:`OFFSET_RELU_AUTO`); any other mode is returned as given."""
    return OFFSET_RELU_AUTO.get(profile, "none") if mode == "auto" else mode


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how: profile, bit width, the bit width of the first/last layer, and whether
    fused kernels' identity taps are split off (``reparam.split_identity``): in ``split_layers`` (the
    decision the calibrate stage measures, ``quant.identity_split``) or, where that is None, in every
    conv whose weight range the split shrinks (the data-free rule)."""

    profile: str = "onnxruntime"
    bits: int = 8
    first_last_bits: int = 8
    split_identity: bool = True
    split_layers: tuple[str, ...] | None = None
    # the grid of tensors quantized only because an integer Add needs them (never a conv's input)
    add_bits: int = 8
    # TensorRT at 8 bits: which post-ReLU tensors get all 256 levels by an offset of -128 s that the
    # reading layers' biases take back (OFFSET_RELU_MODES); the rest keep [0, 127]
    offset_relu: str = "none"
    # activation quantizers raised one precision step (with the weights of the layers reading them):
    # 6 -> 8 bits in a 6-bit build, 8 bits -> float in an 8-bit one (quant.placement.raise_precision)
    fallback: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.split_layers is not None:  # a list when read back from qstate.pt
            object.__setattr__(self, "split_layers", tuple(self.split_layers))
        object.__setattr__(self, "fallback", tuple(self.fallback))
        if self.profile not in PROFILES:
            raise ConfigError(f"`profile` {self.profile}: unknown; choose one of {', '.join(PROFILES)}")
        for opt, b in (("`bits`", self.bits), ("`first_last_bits`", self.first_last_bits),
                       ("`add_bits`", self.add_bits)):
            if b not in (6, 8):
                raise ConfigError(f"{opt} {b}: unsupported; use 8, or 6 (emulated on 8-bit kernels)")
        if self.offset_relu not in OFFSET_RELU_MODES:
            raise ConfigError(f"`offset_relu` {self.offset_relu}: unknown; "
                              f"choose one of {', '.join(OFFSET_RELU_MODES)}")
        if self.offset_relu != "none" and not self.scheme.unsigned_in_int8:
            raise ConfigError(f"`offset_relu` {self.offset_relu}: only for `profile` tensorrt (profile "
                              f"{self.profile} stores post-ReLU tensors as uint8 already); use `offset_relu` none")

    @property
    def scheme(self) -> Profile:
        return PROFILES[self.profile]

    def to_dict(self) -> dict:
        return asdict(self)
