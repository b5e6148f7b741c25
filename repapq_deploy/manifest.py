"""``manifest.json``: each stage's input hashes, options, outputs, timing and outcome.

A stage is skipped when its inputs and options are unchanged and its outputs are still on disk
with the recorded hashes; ``force`` re-runs everything.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from repapq_deploy.artifacts import sha256_file, write_json
from repapq_deploy.environment import code_hash
from repapq_deploy.errors import DeployError
from repapq_deploy.progress import log


class Manifest:
    """The build folder's record of what each stage consumed and produced."""

    def __init__(self, path: Path, versions: dict) -> None:
        self.path = path
        self.data: dict = {"versions": versions, "stages": {}}
        if path.exists():
            try:
                old = json.loads(path.read_text())
                self.data["stages"] = dict(old.get("stages", {}))
            except (json.JSONDecodeError, AttributeError):
                pass  # an unreadable manifest only means nothing can be skipped

    def up_to_date(self, stage: str, inputs: dict[str, str], options: dict) -> dict | None:
        """The recorded result of ``stage`` if it can be skipped, else None."""
        entry = self.data["stages"].get(stage)
        if not entry or entry.get("status") != "ok":
            return None
        if entry.get("inputs") != inputs or entry.get("options") != json.loads(json.dumps(options, default=str)):
            return None
        for name, digest in entry.get("outputs", {}).items():
            path = self.path.parent / name
            if not path.exists() or sha256_file(path) != digest:
                return None
        return entry.get("result", {})

    def run(self, stage: str, inputs: dict[str, str], options: dict, outputs: list[str], fn: Callable[[], dict],
            force: bool = False) -> dict:
        """``fn()``'s result for ``stage``, or the recorded one when the stage is up to date (not ``force``);
        a finished or failed run is recorded. Returns the result as JSON data."""
        inputs = {**inputs, "code": code_hash()}  # a different tool version re-runs every stage
        cached = None if force else self.up_to_date(stage, inputs, options)
        if cached is not None:
            log(f"[dim]{stage}: up to date, skipped[/dim]")
            return cached
        log(f"[bold]{stage}[/bold] ...")
        t0 = time.perf_counter()
        try:
            result = fn()
        except Exception:
            self.record(stage, inputs, options, [], {}, time.perf_counter() - t0, status="failed")
            raise
        self.record(stage, inputs, options, outputs, result, time.perf_counter() - t0)
        log(f"{stage}: done in {time.perf_counter() - t0:.1f} s")
        return json.loads(json.dumps(result, default=str))

    def output_hash(self, stage: str, name: str) -> str:
        """Recorded hash of one output of an earlier stage."""
        try:
            return self.data["stages"][stage]["outputs"][name]
        except KeyError:
            raise DeployError(f"{self.path}: stage '{stage}' has no record of {name}; re-run with `force`") from None

    def record(self, stage: str, inputs: dict[str, str], options: dict, outputs: list[str],
               result: dict, seconds: float, status: str = "ok") -> None:
        """Record a finished (or failed) stage and rewrite the manifest atomically."""
        self.data["stages"][stage] = {
            "status": status,
            "inputs": inputs,
            "options": json.loads(json.dumps(options, default=str)),
            "outputs": {name: sha256_file(self.path.parent / name) for name in outputs},
            "seconds": round(seconds, 3),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "result": json.loads(json.dumps(result, default=str)),
        }
        write_json(self.path, self.data)
