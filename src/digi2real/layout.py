"""Where `digi2real run` keeps each stage's artifacts inside a run directory (``output_dir`` of the config)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run. Every stage writes only under its own path; ``pipeline.json`` records what is done."""

    root: Path

    @property
    def state(self) -> Path:
        return self.root / "pipeline.json"  # per stage: fingerprint, complete, timings

    def heartbeat(self, rank: int) -> Path:
        """A process's sign of life in a multi-process launch (digi2real.liveness): rank 0's for the others, theirs
        for rank 0 while it waits for their shards."""
        return self.root / "heartbeats" / f"rank-{rank}.json"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"  # the resolved experiment config

    @property
    def models(self) -> Path:
        return self.root / "models"  # miniature models (demo): Arc2Face/, sd15/, Arc2Face/arcface.onnx

    @property
    def embeddings(self) -> Path:
        return self.root / "embeddings"  # `embed` (EmbeddingStore directory)

    @property
    def ids(self) -> Path:
        return self.root / "ids.csv"  # `select`

    @property
    def plan(self) -> Path:
        return self.root / "plan.parquet"  # `plan`

    @property
    def shift(self) -> Path:
        return self.root / "shift.safetensors"  # `shift` (+ shift.features.npz beside it)

    @property
    def dataset(self) -> Path:
        return self.root / "dataset"  # `generate`: images/, manifest/, generation.json, card.md

    @property
    def audit(self) -> Path:
        return self.root / "audit"  # `audit`: audit.json/.md/.html, section.html, cache/

    @property
    def packed(self) -> Path:
        return self.root / "packed"  # `pack`: train.rec, train.idx, property

    @property
    def train(self) -> Path:
        return self.root / "train"  # `train`: model.pt, train_log.jsonl, config

    @property
    def eval(self) -> Path:
        return self.root / "eval"  # `eval`: results.json/.md/.csv, roc_*.png, curves.npz

    @property
    def benchmarks(self) -> Path:
        return self.root / "benchmarks"  # miniature runs: the procedural verification set (pairs file + images)

    @property
    def report(self) -> Path:
        return self.root / "report.html"  # `report`: one self-contained page
