"""repapq-deploy: deploy reparameterizable CNNs as accurate INT8 / INT6-emulated engines."""

__version__ = "0.1.0"
