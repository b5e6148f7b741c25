"""``python -m repapq_deploy``."""

from repapq_deploy.cli import main

main()
