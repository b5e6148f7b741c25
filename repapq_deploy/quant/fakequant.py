"""Fake-quantization modules, bit-exact with ONNX QuantizeLinear/DequantizeLinear.

Forward: ``q = clamp(round_half_even(x / s), qmin, qmax); y = q * s`` in float32, which is exactly
what ONNX's Q (saturating) followed by DQ computes. While exporting to ONNX the same modules emit
real Q/DQ nodes (and a ``Clip`` for grids narrower than int8), so the exported graph is the
calibrated model by construction rather than by a separate re-implementation.

Gradients use the straight-through estimator for rounding, and LSQ-style gradients reach the
scales, so reconstruction-based calibration can train them.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from repapq_deploy.quant.scheme import IntFormat


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def fake_quant(x: torch.Tensor, scale: torch.Tensor, fmt: IntFormat) -> torch.Tensor:
    """Quantize-dequantize ``x`` with ``scale`` (broadcastable) on ``fmt``'s grid."""
    if fmt.offset:
        # the same float operations as the exported Sub -> Q -> DQ -> (+ shift), so ties round alike
        shift = scale * fmt.offset
        q = torch.clamp(_round_ste((x - shift) / scale), fmt.qmin - fmt.offset, fmt.qmax - fmt.offset)
        return q * scale + shift
    return torch.clamp(_round_ste(x / scale), fmt.qmin, fmt.qmax) * scale


def _zero_point(g, signed: bool, channels: int | None = None):
    dtype = torch.int8 if signed else torch.uint8
    value = torch.zeros(channels, dtype=dtype) if channels else torch.tensor(0, dtype=dtype)
    return g.op("Constant", value_t=value)


class _ActQDQ(torch.autograd.Function):
    """Export-only: per-tensor activation Q/DQ, plus a Clip when the grid is narrower than int8.

    ``clip`` is ``"float"`` (Clip before Q: TensorRT fuses it into the producing conv), ``"integer"``
    (Clip on the integer tensor between Q and DQ: ONNX Runtime still fuses DQ-Conv-Q into
    QLinearConv around it) or ``"none"``. All three compute ``clamp(round(x / s), qmin, qmax) * s``.
    With ``offset`` (IntFormat.offset) the grid is stored shifted: ``Sub(x, shift) -> Q -> DQ -> Add(shift)``.
    """

    @staticmethod
    def forward(ctx, x, scale, lo, hi, shift, qmin: int, qmax: int, storage_signed: bool, clip: str,  # noqa: ARG004
                zero_point: int, offset: int):
        return torch.clamp(torch.round((x - shift) / scale), qmin - offset, qmax - offset) * scale + shift

    @staticmethod
    def symbolic(g, x, scale, lo, hi, shift, qmin, qmax, storage_signed, clip, zero_point, offset):
        if clip == "float":
            x = g.op("Clip", x, lo, hi)
        if offset:
            # [0, 255] in int8: store x - shift (shift = offset * s); the Add after the DQ restores x,
            # and export.onnx folds it into the bias of the layers that read the tensor
            dq = _ActQDQ.symbolic(g, g.op("Sub", x, shift), scale, lo, hi, shift, qmin - offset,
                                  qmax - offset, storage_signed, "none", 0, 0)
            return g.op("Add", dq, shift)
        if zero_point:
            # signed grid [qmin, qmax] stored as uint8 [qmin + zp, qmax + zp]: Q/DQ compute the same values
            zp = g.op("Constant", value_t=torch.tensor(zero_point, dtype=torch.uint8))
            dtype, qmin, qmax = torch.uint8, qmin + zero_point, qmax + zero_point
        else:
            zp = _zero_point(g, storage_signed)
            dtype = torch.int8 if storage_signed else torch.uint8
        q = g.op("QuantizeLinear", x, scale, zp)
        if clip == "integer":
            q = g.op("Clip", q, g.op("Constant", value_t=torch.tensor(qmin, dtype=dtype)),
                     g.op("Constant", value_t=torch.tensor(qmax, dtype=dtype)))
        return g.op("DequantizeLinear", q, scale, zp)


class _WeightDQ(torch.autograd.Function):
    """Export-only: int8 weight initializer followed by a per-channel DequantizeLinear (axis 0)."""

    @staticmethod
    def forward(ctx, w_int, scale):
        shape = (-1,) + (1,) * (w_int.dim() - 1)
        return w_int.float() * scale.view(shape)

    @staticmethod
    def symbolic(g, w_int, scale):
        channels = w_int.type().sizes()[0]
        return g.op("DequantizeLinear", w_int, scale, _zero_point(g, True, channels), axis_i=0)


class ActQuantizer(nn.Module):
    """Per-tensor activation quantizer.

    Modes: ``observe`` passes ``x`` through and feeds the attached observer (calibration
    statistics), ``quant`` fake-quantizes, ``off`` passes through.
    """

    def __init__(self, fmt: IntFormat, nonnegative: bool, integer_clip: bool = False,
                 upper: float | None = None, zero_point: int = 0) -> None:
        super().__init__()
        self.fmt = fmt
        self.nonnegative = nonnegative
        self.integer_clip = integer_clip
        # a bound the input never exceeds (ReLU6: 6); the range is kept within it, see max_scale
        self.upper = upper
        # 128: a signed grid stored as uint8 on export (Profile.signed_as_uint8); the values are the same
        self.zero_point = zero_point
        self.scale = nn.Parameter(torch.tensor(1.0), requires_grad=False)
        self.mode = "off"
        # kept in float (an accuracy-budget fallback): no fake quantization and no Q/DQ on export
        self.floating = False
        self.observer = None
        # QDrop: while training, keep this fraction of elements unquantized (a flatter loss landscape)
        self.drop_prob = 0.0

    @property
    def max_scale(self) -> float:
        """The largest step whose range ``qmax * step`` stays within :attr:`upper` in float32 (inf
        without a bound). A range past a ReLU6's 6 is wasted, and ONNX Runtime then keeps the Clip
        in float instead of fusing it into the quantization (ClipQuantFusion), so the conv before
        it runs in float too."""
        if self.upper is None:
            return math.inf
        step = np.float32(self.upper / self.fmt.qmax)
        while np.float32(step * np.float32(self.fmt.qmax)) > self.upper:
            step = np.nextafter(step, np.float32(0))
        return float(step)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "observe":
            self.observer.update(x.detach())
            return x
        if self.mode == "off" or self.floating:
            return x
        if torch.onnx.is_in_onnx_export():
            lo = self.scale.detach() * self.fmt.qmin
            hi = self.scale.detach() * self.fmt.qmax
            clip = ("integer" if self.integer_clip else "float") if self.fmt.emulated else "none"
            shift = self.scale.detach() * self.fmt.offset
            return _ActQDQ.apply(x, self.scale.detach(), lo, hi, shift, self.fmt.qmin, self.fmt.qmax,
                                 self.fmt.storage_signed, clip, self.zero_point, self.fmt.offset)
        q = fake_quant(x, self.scale, self.fmt)
        if self.training and self.drop_prob > 0:
            return torch.where(torch.rand_like(x) < self.drop_prob, x, q)
        return q

    def extra_repr(self) -> str:
        kind = "float" if self.floating else "int" if self.fmt.signed else "uint"
        return f"{kind}{self.fmt.bits}, scale={self.scale.item():.4g}, mode={self.mode}"


# AdaRound's rectified sigmoid stretch (Nagel et al. 2020)
_ZETA, _GAMMA = 1.1, -0.1


class WeightQuantizer(nn.Module):
    """Symmetric per-output-channel weight quantizer (axis 0).

    With :meth:`enable_adaround` the rounding direction of every weight is learned (AdaRound):
    ``q = clamp(floor(w / s) + h(alpha))`` with ``h`` a rectified sigmoid in [0, 1] that a
    regulariser pushes to 0 or 1; :meth:`hard_rounded` then gives the weights to keep.
    """

    def __init__(self, fmt: IntFormat, channels: int) -> None:
        super().__init__()
        self.fmt = fmt
        self.scale = nn.Parameter(torch.ones(channels), requires_grad=False)
        self.enabled = False
        self.floating = False  # kept in float (an accuracy-budget fallback): never enabled

    def _scale(self, w: torch.Tensor) -> torch.Tensor:
        return self.scale.view((-1,) + (1,) * (w.dim() - 1))

    @property
    def has_adaround(self) -> bool:
        return "alpha" in self._parameters

    def enable_adaround(self, w: torch.Tensor) -> None:
        """Start learning the rounding of ``w`` from round-to-nearest's soft equivalent (h = frac(w/s))."""
        x = w.detach() / self._scale(w).detach()
        rest = (x - x.floor()).clamp(1e-4, 1 - 1e-4)
        self.alpha = nn.Parameter(-torch.log((_ZETA - _GAMMA) / (rest - _GAMMA) - 1))

    def rounding(self) -> torch.Tensor:
        """The soft rounding offsets h(alpha) in [0, 1]."""
        return torch.clamp(torch.sigmoid(self.alpha) * (_ZETA - _GAMMA) + _GAMMA, 0, 1)

    @torch.no_grad()
    def hard_rounded(self, w: torch.Tensor) -> torch.Tensor:
        """The dequantized weights with the learned rounding made hard; drops ``alpha``."""
        s = self._scale(w)
        q = torch.clamp(torch.floor(w / s) + (self.alpha >= 0).to(w.dtype), self.fmt.qmin, self.fmt.qmax)
        del self.alpha
        return q * s

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        if self.has_adaround:
            s = self._scale(w)
            q = torch.floor(w.detach() / s.detach()) + self.rounding()
            return torch.clamp(q, self.fmt.qmin, self.fmt.qmax) * s
        return fake_quant(w, self._scale(w), self.fmt)

    def integer(self, w: torch.Tensor) -> torch.Tensor:
        """The stored integer weights (int8 storage, values on this quantizer's grid)."""
        q = torch.clamp(torch.round(w.detach() / self._scale(w).detach()), self.fmt.qmin, self.fmt.qmax)
        return q.to(torch.int8)


class _BiasDQ(torch.autograd.Function):
    """Export-only: int32 bias initializer with scale ``s_x * s_w`` (per channel), as ORT expects."""

    @staticmethod
    def forward(ctx, b_int, scale):
        return b_int.float() * scale

    @staticmethod
    def symbolic(g, b_int, scale):
        channels = b_int.type().sizes()[0]
        zp = g.op("Constant", value_t=torch.zeros(channels, dtype=torch.int32))
        return g.op("DequantizeLinear", b_int, scale, zp, axis_i=0)


_INT32 = IntFormat(32, signed=True)


class _QuantWeightMixin:
    """Shared by conv and linear: the weight passes through a WeightQuantizer (int8 + DQ on export),
    and, where the profile asks for it, the bias is quantized to int32 on the ``s_x * s_w`` grid."""

    weight_quantizer: WeightQuantizer
    # The ActQuantizer feeding this layer; a plain attribute (not a submodule) because it belongs
    # to the graph. Set by placement when the profile quantizes biases.
    input_quantizer: ActQuantizer | None = None

    def enable_affine(self) -> None:
        """QPRep: learn a channel-wise affine ``y = eta * op(Q(x), Q(W)) + eps`` on this layer's output.

        ``eta`` starts at 1 and ``eps`` at the bias; :meth:`fold_affine` folds both away exactly.
        """
        channels = self.weight.shape[0]
        bias = self.bias.detach().clone() if self.bias is not None else torch.zeros(channels)
        self.eta = nn.Parameter(torch.ones(channels, device=self.weight.device))
        self.eps = nn.Parameter(bias.to(self.weight.device))

    @property
    def has_affine(self) -> bool:
        return "eta" in self._parameters

    def _affine(self, y: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (y.dim() - 2)
        eps = self.eps
        if self.input_quantizer is not None and self.weight_quantizer.enabled:
            # where the profile stores int32 biases, train eps on the grid it will have after the fold
            # (s_x * |eta| s_w, computed as _bias_scale will): its rounding error is often a sizeable
            # fraction of the next activation step
            scale = self.input_quantizer.scale * (self.weight_quantizer.scale * self.eta.abs()).clamp_min(1e-12)
            eps = fake_quant(eps, scale.detach(), _INT32)
        return y * self.eta.view(shape) + eps.view(shape)

    @torch.no_grad()
    def bake_adaround(self) -> None:
        """Replace the weights by their AdaRound-rounded values, so that round-to-nearest (export,
        :meth:`fold_affine`) reproduces the learned integers exactly."""
        if self.weight_quantizer.has_adaround:
            self.weight.copy_(self.weight_quantizer.hard_rounded(self.weight))

    @torch.no_grad()
    def fold_affine(self) -> None:
        """Fold eta into the per-channel weight scale (``|eta| * s_w``; a negative eta flips that
        channel's integer weights) and eps into the bias. The integer weights are taken before the
        fold, so rounding cannot change them."""
        if not self.has_affine:
            return
        eta, eps = self.eta.detach(), self.eps.detach()
        wq = self.weight_quantizer
        w_int = wq.integer(self.weight).float()
        sign = torch.where(eta < 0, -1.0, 1.0)
        scale = (wq.scale.detach() * eta.abs()).clamp_min(1e-12)
        shape = (-1,) + (1,) * (self.weight.dim() - 1)
        # the float weight becomes the dequantized value, so integer() returns sign * w_int exactly
        self.weight.copy_(w_int * sign.view(shape) * scale.view(shape))
        wq.scale.copy_(scale)
        del self.eta, self.eps
        if self.bias is None:
            self.bias = nn.Parameter(eps.clone())
        else:
            self.bias.copy_(eps)

    def attach_input_quantizer(self, quantizer: ActQuantizer) -> None:
        """Quantize the bias on this quantizer's grid times the weight's (int32, ORT style)."""
        object.__setattr__(self, "input_quantizer", quantizer)  # not a submodule: owned by the graph

    def _bias_scale(self) -> torch.Tensor:
        return self.input_quantizer.scale * self.weight_quantizer.scale

    def quantized_bias(self) -> torch.Tensor | None:
        if self.bias is None or self.input_quantizer is None or not self.weight_quantizer.enabled:
            return self.bias
        if torch.onnx.is_in_onnx_export():
            return _BiasDQ.apply(self.bias_int32, self.bias_scale)
        return fake_quant(self.bias, self._bias_scale(), _INT32)

    def quantized_weight(self) -> torch.Tensor:
        wq = self.weight_quantizer
        if wq.enabled and torch.onnx.is_in_onnx_export():
            return _WeightDQ.apply(self.weight_int8, wq.scale.detach())
        return wq(self.weight)

    def freeze_integer_weight(self) -> None:
        """Store the integer weights as a buffer; the exporter turns buffers into int8 initializers
        (an expression of the float weight would be traced as Div/Round/Clip/Cast nodes)."""
        self.register_buffer("weight_int8", self.weight_quantizer.integer(self.weight), persistent=False)
        if self.bias is not None and self.input_quantizer is not None:
            scale = self._bias_scale().detach()
            q = torch.clamp(torch.round(self.bias.detach() / scale), _INT32.qmin, _INT32.qmax)
            self.register_buffer("bias_int32", q.to(torch.int32), persistent=False)
            self.register_buffer("bias_scale", scale, persistent=False)


class QuantConv2d(nn.Conv2d, _QuantWeightMixin):
    """``nn.Conv2d`` with a per-channel weight quantizer."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, fmt: IntFormat) -> QuantConv2d:
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                device=conv.weight.device, dtype=conv.weight.dtype)
        q.load_state_dict(conv.state_dict())
        q.weight_quantizer = WeightQuantizer(fmt, conv.out_channels)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.has_affine:
            return self._affine(self._conv_forward(x, self.quantized_weight(), None))
        return self._conv_forward(x, self.quantized_weight(), self.quantized_bias())


class QuantLinear(nn.Linear, _QuantWeightMixin):
    """``nn.Linear`` with a per-output-channel weight quantizer."""

    @classmethod
    def from_float(cls, linear: nn.Linear, fmt: IntFormat) -> QuantLinear:
        q = cls(linear.in_features, linear.out_features, linear.bias is not None,
                device=linear.weight.device, dtype=linear.weight.dtype)
        q.load_state_dict(linear.state_dict())
        q.weight_quantizer = WeightQuantizer(fmt, linear.out_features)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.has_affine:
            return self._affine(F.linear(x, self.quantized_weight(), None))
        return F.linear(x, self.quantized_weight(), self.quantized_bias())
