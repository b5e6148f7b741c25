"""repapq-deploy: deploy reparameterizable CNNs as accurate INT8 / INT6-emulated engines.

::

    import repapq_deploy as rd

    qm = rd.quantize(model, calib_loader, bits=8, profile="onnxruntime")
    engine = rd.build_engine(qm, out="engines/my-model")
    report = rd.verify(qm, engine, eval_loader)

Names are imported on first use, so ``import repapq_deploy`` (and the command line's ``--help``) stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

import repapq_deploy.verify as _verify_stage  # noqa: F401  (bound first, so `verify` below is the function)

__version__ = "0.2.0"

_EXPORTS = {
    "quantize": "repapq_deploy.api", "build_engine": "repapq_deploy.api",
    "build": "repapq_deploy.api", "QuantizedModel": "repapq_deploy.api", "Report": "repapq_deploy.api",
    "Accuracy": "repapq_deploy.api", "Latency": "repapq_deploy.api", "Engine": "repapq_deploy.backends.engine",
    "EngineInfo": "repapq_deploy.backends.base", "Recipe": "repapq_deploy.recipe",
    "BuildOptions": "repapq_deploy.options", "DeployError": "repapq_deploy.errors",
    "InputError": "repapq_deploy.errors", "ConfigError": "repapq_deploy.errors",
    "BackendUnavailableError": "repapq_deploy.errors",
}
__all__ = [
    "Accuracy", "BackendUnavailableError", "BuildOptions", "ConfigError", "DeployError", "Engine", "EngineInfo",
    "InputError", "Latency", "QuantizedModel", "Recipe", "Report", "__version__", "build", "build_engine",
    "quantize", "verify",
]

if TYPE_CHECKING:
    from repapq_deploy.api import Accuracy, Latency, QuantizedModel, Report, build, build_engine, quantize
    from repapq_deploy.backends.base import EngineInfo
    from repapq_deploy.backends.engine import Engine
    from repapq_deploy.errors import BackendUnavailableError, ConfigError, DeployError, InputError
    from repapq_deploy.options import BuildOptions
    from repapq_deploy.recipe import Recipe


def verify(*args, **kwargs):
    """:func:`repapq_deploy.api.verify` (the stage's package is ``repapq_deploy.verify``)."""
    from repapq_deploy.api import verify as run

    return run(*args, **kwargs)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'repapq_deploy' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
