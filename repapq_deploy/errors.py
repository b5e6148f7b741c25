"""Typed user-facing errors.

Library code names a setting by its Python name in backticks (`` `calib` ``, `` `offset_relu` ``);
``str(error)`` shows the Python name to library users, and the command line renders the same message
with its own flag for that setting (``--calib``, ``recipe key offset_relu``), so neither surface
speaks the other's language.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_SETTING = re.compile(r"`([a-z][a-z0-9_]*)`")


class DeployError(Exception):
    """A user-facing failure: the message names the file or setting and says what to do."""

    def render(self, name: Callable[[str], str]) -> str:
        """The message with every `` `setting` `` replaced by ``name(setting)``."""
        return _SETTING.sub(lambda m: name(m.group(1)), super().__str__())

    def __str__(self) -> str:
        return self.render(lambda setting: setting)


class InputError(DeployError):
    """A model file, data set, report or baseline that cannot be used as given."""


class ConfigError(DeployError):
    """A setting (option, argument or recipe key) with a bad or contradictory value."""


class BackendUnavailableError(DeployError):
    """The requested engine backend cannot run on this machine."""
