"""Stage 2, reparam: fuse multi-branch blocks and fold BatchNorm, with an exactness check."""

from repapq_deploy.reparam.fuse import FuseReport, fuse_model, split_identity

__all__ = ["FuseReport", "fuse_model", "split_identity"]
