"""OVERRIDES, the one environment variable that carries params.yaml changes to a cloud node: `key=value` words,
shell-quoted, so a value may hold spaces (`train.lora_r=16 'model.system_prompt=Be brief.'`).

    python -m skytune.face.cloud.overrides   # the words of $OVERRIDES, NUL-separated (sky/node.sh: each one -S)
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

from skytune.core.errors import SkytuneError, reported
from skytune.core.params import PARAMS_FILE, load_params

ENV = "OVERRIDES"
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")


class OverridesError(SkytuneError):
    """OVERRIDES does not parse; the message names the variable and the word."""


def parse(text: str) -> list[tuple[str, str]]:
    """`"a.b=1 'c.d=x y'"` -> [("a.b", "1"), ("c.d", "x y")]."""
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise OverridesError(f"{ENV}={text!r}: {exc} (quote a value with spaces: 'key=a value')") from None
    pairs = []
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or not _KEY.fullmatch(key):
            raise OverridesError(f"{ENV}: {word!r} is not section.key=value (params.yaml keys, e.g. train.lora_r=16)")
        pairs.append((key, value))
    return pairs


def render(pairs: list[tuple[str, str]] | dict[str, str]) -> str:
    """The inverse of parse: what to put in OVERRIDES."""
    items = pairs.items() if isinstance(pairs, dict) else pairs
    return " ".join(shlex.quote(f"{key}={value}") for key, value in items)


def check(pairs: list[tuple[str, str]] | dict[str, str], params_file: Path = PARAMS_FILE) -> None:
    """Apply the overrides to a copy of params.yaml exactly as `dvc exp run -S` will (DVC's own Hydra override
    code), then load it: OverridesError for what Hydra refuses (a comma is a sweep, which dvc exp run refuses without
    --queue; quote such a value: key='"a, b"'), ParamsError for an unknown key, a wrong type or a bad range."""
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.hydra import apply_overrides, to_hydra_overrides
    from hydra.errors import OverrideParseException

    words = [f"{key}={value}" for key, value in (pairs.items() if isinstance(pairs, dict) else pairs)]
    try:
        parsed = to_hydra_overrides(words)
    except OverrideParseException as exc:
        raise OverridesError(f"{ENV}: dvc exp run -S cannot parse it (Hydra's override grammar; quote a value "
                             f"holding , ' # or brackets: key='\"...\"'): {exc}") from None
    sweeps = [word for word, override in zip(words, parsed, strict=True) if override.is_sweep_override()]
    if sweeps:
        raise OverridesError(f"{ENV}: {sweeps} would be a Hydra sweep (a comma or range), which dvc exp run refuses "
                             "without --queue: one value per job (a grid is `make sweep`), or quote it: "
                             "key='\"a, b\"'")
    with tempfile.TemporaryDirectory() as tmp:
        trial = Path(tmp) / params_file.name
        shutil.copyfile(params_file, trial)
        try:
            apply_overrides(trial, words)
        except InvalidArgumentError as exc:
            _explain(words, params_file, trial)  # an unknown key: the schema's error names it and the likely one
            raise OverridesError(f"{ENV}: {exc}: {exc.__cause__}") from None
        load_params(trial)


def _explain(words: list[str], params_file: Path, trial: Path) -> None:
    """Set the keys plainly (no Hydra) and load: raises the schema's ParamsError ("did you mean ...") if it can."""
    data = yaml.safe_load(params_file.read_text(encoding="utf-8"))
    for word in words:
        key, _, value = word.partition("=")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node[leaf] = yaml.safe_load(value)
    trial.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    load_params(trial)


def main() -> int:
    try:
        pairs = parse(os.environ.get(ENV, ""))
    except OverridesError as exc:
        print(exc, file=sys.stderr)
        return 2
    sys.stdout.write("".join(f"{key}={value}\0" for key, value in pairs))
    return 0


if __name__ == "__main__":
    with reported():
        sys.exit(main())
