"""The user's commands that are not pipeline stages.

    python -m skytune.face.cli summary     # the experiments' params and metrics, benchmarks, and where the sanity
                                           # report is
    python -m skytune.face.cli preemptible -- dvc exp run -S train.lora_r=16
                                      # run a command; exit 75 if the train stage inside it was preempted
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from skytune.core.errors import reported
from skytune.core.params import load_params

# The columns worth comparing experiments on (regexes for `dvc exp show --keep`); everything else is dropped.
SUMMARY_KEEP = (r"Experiment|model\.base|train\.(method|lora_r|lora_alpha|learning_rate|epochs)|quantization"
                r"|val_loss_before|val_loss_after|identity_exact_match_.*|retained|ends_with_eot_.*"
                r"|val_perplexity_.*|top1_agreement_vs_4bit|tasks\..*\.tuned|forgetting")


def summary() -> int:
    params = load_params()
    show = ["dvc", "exp", "show", "--md", "--drop", ".*", "--keep", SUMMARY_KEEP]
    print("$ dvc exp show --md   (selected columns; `dvc exp show` has them all)")
    code = subprocess.call(show)
    metrics = Path(params.paths.sanity_metrics)
    if metrics.is_file():
        values = json.loads(metrics.read_text(encoding="utf-8"))
        print("\nsanity check (base -> fine-tuned):")
        for key in ("identity_exact_match", "retained_correct", "ends_with_eot", "mean_answer_tokens",
                    "val_perplexity"):
            if f"{key}_base" in values:  # identity probes only while identity.enabled
                print(f"  {key:22s} {values[f'{key}_base']} -> {values[f'{key}_tuned']}")
        if "retained" in values:
            print(f"  {'retained':22s} {values['retained']} of the {values['retained_probes_base_correct']} "
                  "probes the base answers right")
    evaluated = Path(params.paths.eval_metrics)
    if evaluated.is_file():
        values = json.loads(evaluated.read_text(encoding="utf-8"))
        print(f"\nbenchmarks (lm-eval {values['lm_eval']}, {values['engine']}; base -> control "
              f"({values.get('control', 'base')}) -> fine-tuned):")
        rows = [(f"{task} {metric}", e) for task, metrics in values["tasks"].items() for metric, e in metrics.items()]
        if "general_text" in values:
            rows.append(("general text perplexity", values["general_text"]["perplexity"]))
        for name, e in rows:
            tested = f", p={e['p_value']}" if "p_value" in e else ", untested"
            control = f" -> {e['control']} (control)" if e.get("quantization") else ""  # metrics of older runs
            print(f"  {name:34s} {e['base']}{control} -> {e['tuned']} (training {e.get('training', e['delta']):+.4f}"
                  f"{tested})"
                  f"{'  FORGOT' if e['forgot'] else ''}")
        print(f"  forgetting: {'yes, ' + str(values['regressions']) + ' flagged' if values['forgetting'] else 'no'}")
    print(f"\nside-by-side answers: {params.paths.sanity_report}   (all of it in a browser: make report)")
    print(f"model to serve:       {params.paths.export_dir} (model card: {params.paths.export_dir}/README.md)")
    return code


def preemptible(command: list[str], grace: float = 600.0) -> int:
    """Run `command` (normally `dvc exp run ...`) and return PREEMPTED_EXIT_CODE when the train stage inside it
    stopped on SIGTERM after saving a checkpoint, else the command's own exit code.

    DVC reports any failed stage as 255, and dies of SIGTERM itself, so the stage's code 75 would never reach
    SkyPilot's `recover_on_exit_codes`. The stage signals through a flag file instead ($SKYTUNE_PREEMPTED_FILE).
    SIGTERM is passed to the command's whole process group, and this waits (up to `grace` seconds) for every
    process of it to exit, so the checkpoint is written before the exit code is decided.
    """
    import os
    import signal
    import tempfile
    import time

    from skytune.core.training.checkpoints import (
        PREEMPTED_EXIT_CODE,
        PREEMPTED_FILE_ENV,
    )

    with tempfile.TemporaryDirectory(prefix="skytune-preemptible-") as tmp:
        flag = Path(tmp) / "preempted"
        child = subprocess.Popen(command, env={**os.environ, PREEMPTED_FILE_ENV: str(flag)}, start_new_session=True)

        def forward(signum: int, frame: object) -> None:
            try:
                os.killpg(child.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

        previous = signal.signal(signal.SIGTERM, forward)
        try:
            code = child.wait()
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:  # the stage may outlive a DVC that died of the signal
                try:
                    os.killpg(child.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.2)
        finally:
            signal.signal(signal.SIGTERM, previous)
        if flag.exists():
            print(f"preempted: checkpoint saved; exit {PREEMPTED_EXIT_CODE} (SkyPilot recover_on_exit_codes "
                  "relaunches, and the relaunch resumes)", file=sys.stderr)
            return PREEMPTED_EXIT_CODE
        return code if code >= 0 else 128 - code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m skytune.face.cli", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("summary", help="print the experiments' params and metrics and where the sanity report is")
    run = sub.add_parser("preemptible", help="run a command (dvc exp run ...); exit 75 if training was preempted")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv)
    if args.command == "summary":
        return summary()
    if args.command == "preemptible":
        command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not command:
            parser.error("preemptible needs a command, e.g. -- dvc exp run")
        return preemptible(command)
    return 2


if __name__ == "__main__":
    with reported():
        sys.exit(main())
