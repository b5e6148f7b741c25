"""Model families: extra timm registry entries and the authors' checkpoint layouts."""

from repapq_deploy.models.registry import register_builtin_models

register_builtin_models()
