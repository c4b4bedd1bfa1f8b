"""Check sky/*.yaml with SkyPilot's own parser, offline and without cloud credentials (run it in the launcher's
environment: `make launcher`, then `.venv-sky/bin/python sky/validate.py sky/*.yaml`).

Task, resources, storage mounts, job recovery and (for SkyServe) the service section are validated against
SkyPilot's schema; envs that must be given at launch are filled with placeholders, and every ${VAR} in the workdir
and file mounts must have been substituted. Exits 1 naming every file that fails.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml


# SkyPilot's schema leaves job_recovery unchecked (a misspelt key is silently ignored): checked here.
JOB_RECOVERY_KEYS = {"strategy", "max_restarts_on_errors", "recover_on_exit_codes"}
JOB_RECOVERY_STRATEGIES = {"FAILOVER", "EAGER_NEXT_REGION"}


def _job_recovery_problem(config: dict) -> str | None:
    recovery = (config.get("resources") or {}).get("job_recovery")
    if not isinstance(recovery, dict):
        return None
    unknown = set(recovery) - JOB_RECOVERY_KEYS
    if unknown:
        return f"resources.job_recovery: unknown key(s) {sorted(unknown)}; known: {sorted(JOB_RECOVERY_KEYS)}"
    if str(recovery.get("strategy", "EAGER_NEXT_REGION")).upper() not in JOB_RECOVERY_STRATEGIES:
        return f"resources.job_recovery.strategy: {recovery['strategy']!r}; one of {sorted(JOB_RECOVERY_STRATEGIES)}"
    return None


def check(path: Path) -> str | None:
    """None when SkyPilot accepts the YAML, else why not."""
    import sky

    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    problem = _job_recovery_problem(config)
    if problem:
        return problem
    # Envs left null must be given at launch (--env): filled here. Null secrets are SkyPilot's managed references,
    # accepted as they are.
    placeholders = [(k, "placeholder") for k, v in (config.get("envs") or {}).items() if v is None]
    try:
        task = sky.Task.from_yaml_config(config, env_overrides=placeholders)
        if "service" in config and task.service is None:
            return "the service section was not parsed"
        left = [f"{where}: {text}" for where, text in (("workdir", task.workdir), ("file_mounts", task.file_mounts))
                if "${" in str(text)]
        if left:
            return f"a variable was not substituted (not in envs?): {left}"
    except Exception as exc:  # noqa: BLE001 - SkyPilot raises several types for an invalid YAML
        return f"{type(exc).__name__}: {exc}"
    return None


def main(argv: list[str]) -> int:
    failed = 0
    for name in argv:
        problem = check(Path(name))
        print(f"{'ok ' if problem is None else 'BAD'} {name}{'' if problem is None else ': ' + problem}")
        failed += problem is not None
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
