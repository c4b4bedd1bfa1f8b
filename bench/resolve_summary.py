"""The summary of a `pip install --dry-run --report` (bench/gpu_check.sh --dry-run): how many packages resolved,
the versions that matter on a GPU node, and every pin of the requirements file that the resolution honours.

    python bench/resolve_summary.py REPORT.json requirements-vllm.txt

Exits 1 when a pin of the requirements file (followed through `-r` includes) is not what resolved.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

KEY = ("vllm", "torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "lm-eval", "numpy",
       "flashinfer-python", "triton", "xformers")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(requirements: Path) -> dict[str, str]:
    """name -> version of every `name==version` line, includes followed."""
    found: dict[str, str] = {}
    for line in requirements.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r "):
            found |= pins(requirements.parent / line[3:].strip())
        elif "==" in line:
            name, version = line.split("==", 1)
            found[normalise(name.split("[", 1)[0])] = version.strip()
    return found


def main(report: Path, requirements: Path) -> int:
    resolved = {normalise(item["metadata"]["name"]): item["metadata"]["version"]
                for item in json.loads(report.read_text(encoding="utf-8"))["install"]}
    print(f"pip's resolver: {requirements} resolves to {len(resolved)} packages")
    print("  " + ", ".join(f"{name} {resolved[name]}" for name in KEY if name in resolved))
    wrong = {name: (version, resolved.get(name)) for name, version in pins(requirements).items()
             if resolved.get(name) != version}
    if wrong:
        print(f"pins not honoured (pinned, resolved): {wrong}")
        return 1
    print(f"  all {len(pins(requirements))} pins of {requirements} honoured")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
