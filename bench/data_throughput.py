"""Data stages at scale: ingest -> to_chat -> split -> merge_data on a synthetic mixed-format source, against a
naive pandas implementation of the same work, side by side in one run. The mix holds alpaca, ShareGPT, OpenAI
messages (parquet), orca (CSV), tool-calling conversations (OpenAI tool_calls and tool results, with their tools)
and messages whose content is a list of parts; rendered with Qwen2.5's template (tools inside) on both sides.

    .venv/bin/python bench/data_throughput.py               # 1M rows (about 10 minutes, most of it the naive run)
    .venv/bin/python bench/data_throughput.py --rows 100000

Each side runs in its own process, so its peak RSS is its own. The naive side reads every file whole into
pandas, converts, validates and hashes row by row with `.apply`, tokenizes one conversation at a time, and
shuffles in memory: what a first script does. Both use the same tokenizer (the embedded default's base, SmolLM2,
which our ingest resolves) and drop conversations longer than train.max_length. Targets (2 cores): ours >= 5x the naive rows/s,
peak RSS < 2 GB, 1M rows in < 90 s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
QWEN25 = Path(__import__("trl").__file__).parent / "chat_templates" / "qwen2_5.jinja"
# Share of rows per format; each format goes to its own file type so every reader is exercised.
MIX = {"alpaca": 0.3, "sharegpt": 0.3, "messages": 0.2, "orca": 0.1, "tools": 0.05, "parts": 0.05}
TOOL = {"type": "function", "function": {"name": "lookup", "description": "Look a word up",
                                         "parameters": {"type": "object", "properties": {"word": {"type": "string"}},
                                                        "required": ["word"]}}}
WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa quebec "
         "romeo sierra tango uniform victor whiskey xray yankee zulu").split()


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."


def generate(raw: Path, rows: int, seed: int = 0) -> dict[str, int]:
    """Synthetic sources with chat-like lengths (a long tail); about 1% exact duplicates and 0.5% invalid rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    raw.mkdir(parents=True, exist_ok=True)
    counts = {fmt: int(rows * share) for fmt, share in MIX.items()}
    counts["alpaca"] += rows - sum(counts.values())

    def long_tail() -> tuple[int, int]:
        return (3, 30) if rng.random() < 0.9 else (30, 200)

    with open(raw / "alpaca.jsonl", "w", encoding="utf-8") as fh:
        previous = None
        for i in range(counts["alpaca"]):
            row = {"instruction": sentence(rng, 4, 20), "input": "" if i % 3 else sentence(rng, 3, 12),
                   "output": sentence(rng, *long_tail())}
            if i % 100 == 0 and previous:
                row = previous  # an exact duplicate
            if i % 200 == 1:
                row = {"instruction": sentence(rng, 3, 5), "output": 7}  # invalid: output is not text
            fh.write(json.dumps(row) + "\n")
            previous = row
    with open(raw / "sharegpt.jsonl", "w", encoding="utf-8") as fh:
        for _ in range(counts["sharegpt"]):
            turns = []
            for _ in range(rng.randint(1, 3)):
                turns += [{"from": "human", "value": sentence(rng, 3, 15)},
                          {"from": "gpt", "value": sentence(rng, *long_tail())}]
            fh.write(json.dumps({"conversations": turns}) + "\n")
    table = {"messages": [[{"role": "user", "content": sentence(rng, 3, 15)},
                           {"role": "assistant", "content": sentence(rng, *long_tail())}]
                          for _ in range(counts["messages"])]}
    pq.write_table(pa.table(table), raw / "messages.parquet")
    with open(raw / "orca.csv", "w", encoding="utf-8", newline="") as fh:
        import csv

        writer = csv.writer(fh)
        writer.writerow(["system_prompt", "question", "response"])
        for _ in range(counts["orca"]):
            writer.writerow(["You are helpful.", sentence(rng, 4, 20), sentence(rng, *long_tail())])
    with open(raw / "tools.jsonl", "w", encoding="utf-8") as fh:
        for i in range(counts["tools"]):
            call = {"id": f"c{i}", "type": "function",
                    "function": {"name": "lookup", "arguments": json.dumps({"word": rng.choice(WORDS)})}}
            if i % 200 == 1:
                call["function"]["arguments"] = "{word: "  # invalid: arguments that are not JSON
            messages = [{"role": "user", "content": sentence(rng, 3, 15)},
                        {"role": "assistant", "content": None, "tool_calls": [call]},
                        {"role": "tool", "tool_call_id": f"c{i}", "content": sentence(rng, 3, 30)},
                        {"role": "assistant", "content": sentence(rng, *long_tail())}]
            fh.write(json.dumps({"messages": messages, "tools": [TOOL]}) + "\n")
    with open(raw / "parts.jsonl", "w", encoding="utf-8") as fh:
        for _ in range(counts["parts"]):
            parts = [{"type": "text", "text": sentence(rng, 3, 10)}, {"type": "text", "text": sentence(rng, 3, 10)}]
            fh.write(json.dumps({"messages": [{"role": "user", "content": parts},
                                              {"role": "assistant", "content": sentence(rng, *long_tail())}]}) + "\n")
    return counts


def configure(work: Path) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["sources"] = [
        {"name": "alpaca", "path": "alpaca.jsonl", "format": "alpaca"},
        {"name": "sharegpt", "path": "sharegpt.jsonl", "format": "auto"},
        {"name": "messages", "path": "messages.parquet", "format": "messages"},
        {"name": "orca", "path": "orca.csv", "format": "orca"},
        {"name": "tools", "path": "tools.jsonl", "format": "messages"},
        {"name": "parts", "path": "parts.jsonl", "format": "auto"},
    ]
    (work / "templates").mkdir()
    (work / "templates" / "qwen2_5.jinja").write_text(QWEN25.read_text(encoding="utf-8"), encoding="utf-8")
    params["model"]["chat_template"] = "templates/qwen2_5.jinja"  # ChatML with tools, on the built-in tokenizer
    params["identity"]["enabled"] = False
    params["merge_data"]["mixture"] = {}
    params["base"]["log_level"] = "WARNING"
    # A realistic SFT sequence length (the embedded default's 256 suits its tiny model only): both sides drop
    # what is longer, measured with the same tokenizer.
    params["train"]["max_length"] = 2048
    (work / "params.yaml").write_text(yaml.safe_dump(params))


# ------------------------------------------------------------------------------------------ the two sides


def run_ours() -> int:
    from skytune.core.atomic import iter_jsonl
    from skytune.core.params import load_params
    from skytune.stages import ingest, merge_data, split, to_chat

    for stage in (ingest, to_chat, split, merge_data):
        start = time.perf_counter()
        stage.main(load_params())
        print(f"  {stage.__name__.rsplit('.', 1)[-1]:10s} {time.perf_counter() - start:6.1f} s", file=sys.stderr)
    paths = load_params().paths
    return sum(1 for f in (paths.train_file, paths.val_file) for _ in iter_jsonl(f))


def run_naive() -> int:
    """The same work as a first pandas script does it: whole files in memory, row-by-row `.apply`."""
    import hashlib

    import pandas as pd
    from transformers import AutoTokenizer

    from skytune.core.models.base import BaseModel, location
    from skytune.core.params import load_params

    params = load_params()
    raw = Path(params.paths.raw_dir)
    tokenizer = AutoTokenizer.from_pretrained(location(BaseModel.load(params.paths.base_model_dir)))
    frames = {
        "alpaca": pd.read_json(raw / "alpaca.jsonl", lines=True, dtype=False),
        "sharegpt": pd.read_json(raw / "sharegpt.jsonl", lines=True, dtype=False),
        "messages": pd.read_parquet(raw / "messages.parquet"),
        "orca": pd.read_csv(raw / "orca.csv", keep_default_na=False),
        "tools": pd.read_json(raw / "tools.jsonl", lines=True, dtype=False),
        "parts": pd.read_json(raw / "parts.jsonl", lines=True, dtype=False),
    }
    tokenizer.chat_template = Path("templates/qwen2_5.jinja").read_text(encoding="utf-8")

    def convert(row: pd.Series, fmt: str):
        if fmt == "alpaca":
            if not isinstance(row["output"], str) or not isinstance(row["instruction"], str):
                return None
            prompt = row["instruction"] + (f"\n\n{row['input']}" if isinstance(row["input"], str) and row["input"]
                                           else "")
            return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
        if fmt == "sharegpt":
            roles = {"human": "user", "gpt": "assistant"}
            return [{"role": roles[t["from"]], "content": t["value"]} for t in row["conversations"]]
        if fmt == "messages":
            return [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        if fmt == "parts":
            return [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str)
                     else "\n".join(p["text"] for p in m["content"])} for m in row["messages"]]
        if fmt == "tools":
            out = []
            for m in row["messages"]:
                m = dict(m)
                if m.get("tool_calls"):
                    try:
                        m["tool_calls"] = [{"type": "function", "function": {
                            "name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}}
                            for c in m["tool_calls"]]
                    except ValueError:
                        return None
                    m["content"] = ""
                out.append(m)
            return out
        return [{"role": "system", "content": row["system_prompt"]}, {"role": "user", "content": row["question"]},
                {"role": "assistant", "content": row["response"]}]

    parts = []
    for fmt, frame in frames.items():
        frame = frame.copy()
        frame["messages_out"] = frame.apply(lambda r, fmt=fmt: convert(r, fmt), axis=1)
        frame = frame[frame["messages_out"].notna()]
        frame["source"] = fmt
        parts.append(frame[["source", "messages_out"]])
    data = pd.concat(parts, ignore_index=True)
    data["id"] = data["messages_out"].apply(lambda m: hashlib.sha256(json.dumps(m).encode()).hexdigest()[:16])
    data = data.drop_duplicates("id")
    data["val"] = data["id"].apply(lambda i: int(hashlib.sha256(f"{params.base.seed}:{i}".encode()).hexdigest(), 16)
                                   / 16**64 < params.split.val_fraction)
    data["tokens"] = data.apply(lambda r: len(tokenizer.apply_chat_template(
        r["messages_out"], tools=[TOOL] if r["source"] == "tools" else None, tokenize=True)), axis=1)
    data = data[data["tokens"] <= params.train.max_length]
    data = data.sample(frac=1.0, random_state=params.base.seed)
    for name, part in (("train", data[~data["val"]]), ("val", data[data["val"]])):
        part[["id", "source", "messages_out"]].rename(columns={"messages_out": "messages"}).to_json(
            f"naive_{name}.jsonl", orient="records", lines=True, force_ascii=False)
    return len(data)


def child(side: str, work: Path) -> None:
    os.chdir(work)
    start = time.perf_counter()
    rows = run_ours() if side == "ours" else run_naive()
    seconds = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"side": side, "seconds": seconds, "rows_out": rows, "peak_rss_mb": peak_kb / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--child", choices=["ours", "naive"])
    parser.add_argument("--work", type=Path)
    parser.add_argument("--sides", default="ours,naive", help="which sides to run (ours first: it builds the "
                        "tokenizer that both use)")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.work)
        return
    work = Path(tempfile.mkdtemp(prefix="data-bench-"))
    try:
        configure(work)
        start = time.perf_counter()
        counts = generate(work / "data" / "raw", args.rows)
        print(f"generated {args.rows} rows {counts} in {time.perf_counter() - start:.1f} s")
        env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
        results = {}
        for side in args.sides.split(","):
            out = subprocess.run([sys.executable, __file__, "--child", side, "--work", str(work)], env=env,
                                 capture_output=True, text=True, check=False)
            if out.returncode:
                sys.exit(f"{side} failed:\n{out.stderr[-3000:]}")
            results[side] = json.loads(out.stdout.strip().splitlines()[-1])
            if side == "ours":
                print("ours, per stage:\n" + "\n".join(line for line in out.stderr.splitlines()
                                                     if line.startswith("  ")))
        for side, r in results.items():
            print(f"{side:6s} {r['seconds']:7.1f} s  {args.rows / r['seconds']:9.0f} rows/s  "
                  f"peak RSS {r['peak_rss_mb']:7.0f} MB  rows out {r['rows_out']}")
        if len(results) < 2:
            return
        ratio = results["naive"]["seconds"] / results["ours"]["seconds"]
        print(f"speed-up (ours vs naive rows/s): {ratio:.1f}x   (target >= 5x; ours < 90 s and < 2048 MB at 1M rows)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
