"""Managed training jobs launched at a pushed commit, so every cloud result is reproducible from git.

    python -m skytune.face.cloud.jobs launch [--overrides "train.lora_r=16"] [--name NAME] [--remote origin] [--dry-run]
                                  [-- extra `sky jobs launch` arguments]
    make launch OVERRIDES="train.lora_r=16" [EXP=name] [YAML=sky/train-multinode.yaml] [SKY_ARGS="--env K=V"]

sky/train.yaml's workdir is this repository cloned by SkyPilot at GIT_REF: the node runs exactly a commit that is
on the git remote, never a laptop's uncommitted edits. So the launch refuses a dirty tree, a commit that is not
pushed, overrides `dvc exp run -S` would refuse, a name already pushed for the commit, a required secret that
is not set here, and a DVC remote or checkpoint bucket that is not the user's own (skytune.face.cloud.buckets); it
passes every secret the YAML names, and $CHECKPOINT_BUCKET. Before launching it computes the data stages for the
commit and overrides here and pushes them with their run-cache (skytune.face.cloud.remote_data), so the GPU node
restores them; --dry-run only reports what the remote lacks.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import yaml

from skytune.core.errors import SkytuneError, reported
from skytune.core.params import ParamsError
from skytune.face.cloud import buckets, prices, remote_data
from skytune.face.cloud import overrides as ov
from skytune.face.commands import SKY, dvc, git
from skytune.face.commands import run as run_command

TRAIN_YAML = Path("sky/train.yaml")
_SCP = re.compile(r"(?:[^@/]+@)?([^:/]+):(.+)")  # git@github.com:org/repo.git
_SSH = re.compile(r"ssh://(?:[^@/]+@)?([^:/]+)(?::\d+)?/(.+)")


class JobError(SkytuneError):
    """The job cannot be launched as asked; the message says what to do."""


@dataclass(frozen=True)
class Source:
    """What a node clones: the repository's https URL and the commit."""

    url: str
    commit: str


def https_url(url: str) -> str:
    """The https form of a git remote URL, without any user or token in it (GIT_REMOTE is a plain env, visible in
    the job queue): nodes authenticate with the GIT_TOKEN secret, never an SSH key."""
    if url.startswith(("https://", "http://")):
        parts = urlsplit(url)
        return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))
    if url.startswith(("file://", "/", ".")):
        return url  # a local path (tests)
    match = _SSH.fullmatch(url) or _SCP.fullmatch(url)
    return f"https://{match.group(1)}/{match.group(2)}" if match else url


def pushed_commit(remote: str = "origin", repo: Path = Path(".")) -> Source:
    """HEAD and the remote's URL, once HEAD is known to be on the remote and the tracked files are committed."""
    dirty = git("status", "--porcelain", "--untracked-files=no", cwd=repo, error=JobError)
    if dirty:
        files = ", ".join(line.split(maxsplit=1)[-1] for line in dirty.splitlines()[:8])
        raise JobError(f"uncommitted changes ({files}): the node runs the pushed commit, not this working tree. "
                       "Commit and push them (hyperparameters go in OVERRIDES, not in edits)")
    head = git("rev-parse", "HEAD", cwd=repo, error=JobError)
    url = git("remote", "get-url", remote, cwd=repo, error=JobError)
    listed = git("ls-remote", "--heads", "--tags", url, cwd=repo, error=JobError)
    tips = {line.split("\t")[0] for line in listed.splitlines()}
    on_remote = head in tips or any(
        run_command(["git", "merge-base", "--is-ancestor", head, tip], cwd=repo, error=None).returncode == 0
        for tip in tips)
    if not on_remote:
        raise JobError(f"HEAD {head[:12]} is not on {remote} ({url}): `git push {remote}` first, so the node can "
                       "clone it and the experiment can be reproduced from it")
    return Source(https_url(url), head)


OPTIONAL_SECRETS = {"HF_TOKEN"}  # a public base model needs none; the others are needed by every job


def secrets_to_pass(train_yaml: Path = TRAIN_YAML, environ: dict[str, str] | None = None) -> list[str]:
    """`--secret NAME` for every secret the YAML names (SkyPilot refuses a job with one left unset), taken from this
    environment; an unset optional one goes empty. JobError names the required ones that are not set."""
    environ = os.environ if environ is None else environ
    names = list(yaml.safe_load(train_yaml.read_text(encoding="utf-8")).get("secrets") or {})
    missing = [n for n in names if not environ.get(n) and n not in OPTIONAL_SECRETS]
    if missing:
        raise JobError(f"{', '.join(missing)} not set here: {train_yaml} passes them to the node as secrets "
                       "(export them; make preflight checks what they can reach)")
    return [arg for n in names for arg in ("--secret", n if environ.get(n) else f"{n}=")]


def refuse_existing(names: list[str], source: Source, remote: str) -> None:
    """A name already pushed for this commit would make the node skip training (a recovery after the push): refuse
    it here, where it costs nothing."""
    listed = dvc("exp", "list", remote, "--rev", source.commit, "--name-only", error=JobError)
    taken = sorted(set(names) & set(listed.split()))
    if taken:
        raise JobError(f"experiment name(s) {', '.join(taken)} already on {remote} for {source.commit[:12]}: "
                       "choose another name (dvc exp pull origin <name> fetches the finished one)")


def owned_buckets(environ: dict[str, str] | None = None) -> list[str]:
    """The `sky jobs launch` arguments that name the user's checkpoint bucket, once the DVC remote and the checkpoint
    bucket are both set (buckets.BucketNotSet says how to set the missing one)."""
    buckets.dvc_remote()
    return ["--env", f"{buckets.CHECKPOINT_BUCKET}={buckets.checkpoint_bucket(environ)}"]


def launch_command(job: str, pairs: list[tuple[str, str]], exp_name: str, source: Source, *, sky: Path,
                   train_yaml: Path = TRAIN_YAML, extra: list[str]) -> list[str]:
    return [str(sky), "jobs", "launch", "--yes", "--detach-run", "--name", job, str(train_yaml),
            "--env", f"GIT_REMOTE={source.url}", "--env", f"GIT_REF={source.commit}",
            "--env", f"OVERRIDES={ov.render(pairs)}", "--env", f"EXP_NAME={exp_name}", *extra]


def checked_pairs(text: str) -> list[tuple[str, str]]:
    """OVERRIDES parsed and applied to params.yaml as dvc exp run -S will: a typo fails here, before any money."""
    try:
        pairs = ov.parse(text)
        ov.check(pairs)
    except (ov.OverridesError, ParamsError) as exc:
        raise JobError(f"nothing launched:\n{exc}") from None
    return pairs


def run(commands: list[list[str]], *, sky: Path, dry_run: bool) -> None:
    for command in commands:
        print("$ " + " ".join(f"'{c}'" if " " in c else c for c in command))
    if dry_run:
        return
    if not sky.is_file():
        raise JobError(f"{sky} not found: run `make launcher` first")
    for command in commands:
        run_command(command, capture=False, error=JobError)
    print(f"watch: {sky} jobs queue; {sky} jobs logs <id>")


def split_sky_args(argv: list[str] | None) -> tuple[list[str], list[str]]:
    """(our arguments, the extra `sky jobs launch` arguments after `--`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        return argv, []
    return argv[: argv.index("--")], argv[argv.index("--") + 1:]


def main(argv: list[str] | None = None) -> int:
    argv, extra = split_sky_args(argv)
    parser = argparse.ArgumentParser(prog="python -m skytune.face.cloud.jobs", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("launch", help="one managed training job (sky/train.yaml) at the pushed HEAD")
    up.add_argument("--overrides", default=os.environ.get(ov.ENV, ""), help='e.g. "train.lora_r=16"')
    up.add_argument("--name", default="", help="the job and experiment name (default: SkyPilot's task id)")
    up.add_argument("--remote", default="origin", help="the git remote the node clones and pushes to")
    up.add_argument("--yaml", type=Path, default=TRAIN_YAML)
    up.add_argument("--dry-run", action="store_true", help="check everything and print the command only")
    up.add_argument("--sky", type=Path, default=SKY)
    args = parser.parse_args(argv)
    pairs = checked_pairs(args.overrides)  # a JobError is said as one message by reported() below
    bucket = owned_buckets()
    source = pushed_commit(args.remote)
    if args.name:
        refuse_existing([args.name], source, args.remote)
    command = launch_command(args.name or args.yaml.stem, pairs, args.name, source, sky=args.sky,
                             train_yaml=args.yaml,
                             extra=[*secrets_to_pass(args.yaml), *bucket, *prices.launch_env(args.yaml, args.sky),
                                    *extra])
    remote_data.prepare([pairs], dry_run=args.dry_run)
    run([command], sky=args.sky, dry_run=args.dry_run)
    return 0


if __name__ == "__main__":
    with reported():
        sys.exit(main())
