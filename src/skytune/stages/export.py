"""export: a self-contained model directory that a serving engine loads, with a model card and a manifest.

    python -m skytune.stages.export      (normally: dvc repro export)

Copies the merged model (config, safetensors, tokenizer, chat template, generation config) to
`paths.export_dir`, adds `README.md` (base + revision, training-data hash, training params, metrics, serving
commands) and `manifest.json` (sha256 and size of every file).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from skytune import packaging
from skytune.atomic import atomic_dir, write_json
from skytune.params import Params
from skytune.stages import run_stage

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def _json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def main(params: Params) -> None:
    paths = params.paths
    training = _json(Path(paths.adapter_dir) / packaging.TRAINING_PARAMS)
    metrics = {"train": _json(paths.train_metrics), "merge_adapters": _json(paths.merge_metrics),
               "sanity_check": _json(paths.sanity_metrics)}
    with atomic_dir(paths.export_dir) as out:
        for item in sorted(Path(paths.merged_dir).iterdir()):
            shutil.copy2(item, out / item.name)
        card = packaging.model_card(
            name=Path(paths.export_dir).name,
            base=training["base_model"],
            data_sha256=packaging.data_hash([Path(paths.train_file), Path(paths.val_file)]),
            training=training,
            metrics=metrics,
        )
        (out / "README.md").write_text(card, encoding="utf-8")
        write_json(out / MANIFEST, packaging.file_manifest(out))
    log.info("exported %s", paths.export_dir)


if __name__ == "__main__":
    run_stage(main)
