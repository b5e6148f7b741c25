"""Stage 6, verify: accuracy and latency parity of the engine against the FP32 model.

``run`` (the stage), ``report`` (metrics, Markdown), ``plots``. Kept free of imports so that the
package's public ``repapq_deploy.verify`` function can share the name (see ``repapq_deploy/__init__``).
"""
