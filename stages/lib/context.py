"""What a stage function receives: where to write, what it reads, the resolved config, the device."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from stages.lib.errors import PipelineError, StageSkipped


@dataclass
class StageContext:
    """Handed to ``stages.<name>.run(ctx)``; the stage returns a dict of metrics (JSON-serialisable).

    - ``out_dir``: the stage's working folder; everything written here becomes the stage's artifacts
      once the stage returns (the pipeline renames it into place atomically). It persists across an
      interrupted run, so training can resume from checkpoints kept in ``out_dir / "ckpt"``.
    - ``inputs``: upstream stage name -> its finished folder. An optional input that was skipped or is
      absent is missing from this dict.
    - ``input_records``: upstream stage name -> its record (record.json contents).
    - ``cfg``: the resolved config as a read-only view limited to what the stage's spec declares
      (``config`` and ``runtime_config`` in ``pipeline/graph.py``): reading anything else raises
      ``ConfigAccessError`` naming the stage and the key, because the cache would not see that value.
    """

    name: str
    out_dir: Path
    run_dir: Path
    cfg: Any
    inputs: dict[str, Path] = field(default_factory=dict)
    input_records: dict[str, dict] = field(default_factory=dict)
    device: str = "cpu"
    force: bool = False
    log: Callable[[str], None] = print
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        from stages.lib.config_view import ConfigView

        if self.cfg is not None and not isinstance(self.cfg, ConfigView):
            from pipeline.graph import BY_NAME  # the graph holds each stage's declarations

            spec = BY_NAME.get(self.name)
            if spec is not None:
                self.cfg = ConfigView(self.cfg, spec.readable, self.name)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def input(self, stage: str) -> Path:
        """Folder of a required upstream stage; a clear error if it is missing."""
        try:
            return self.inputs[stage]
        except KeyError:
            raise PipelineError(
                f"stage {self.name!r} needs the output of stage {stage!r}; run `norm-pipeline stage {stage}` first"
            ) from None

    def artifact(self, stage: str, name: str) -> Path:
        """The path of output ``name`` of input stage ``stage`` (names: ``outputs`` in pipeline/graph.py).

        A clear error if ``stage`` is not an input of this stage (or has not run) or declares no such output.
        Conditional outputs (e.g. baseline's ``kd``) may be absent: the caller checks ``is_file()`` where so."""
        from pipeline.graph import BY_NAME, get

        me = BY_NAME.get(self.name)
        if me is not None and stage not in me.inputs + me.optional_inputs:
            raise PipelineError(f"stage {self.name!r} reads {stage}'s output {name!r} but does not declare {stage!r} "
                                "as an input in pipeline/graph.py")
        rel = get(stage).output(name)
        return Path(self.input(stage)) / rel.rstrip("/")

    def input_metrics(self, stage: str) -> dict:
        return self.input_records.get(stage, {}).get("metrics", {})

    def skip(self, reason: str) -> None:
        raise StageSkipped(reason)

    def write_json(self, name: str, obj: Any) -> Path:
        """Write JSON atomically into ``out_dir``."""
        from stages.lib.io import atomic_write_text

        return atomic_write_text(self.out_dir / name, json.dumps(obj, indent=2, sort_keys=True, default=str))
