"""Prompt files: MT-bench style `{"turns": [t1, ...]}` (first turn used) or `{"prompt": text}` jsonl."""
from __future__ import annotations

import json
from pathlib import Path


def load_prompts(path: str | Path, limit: int | None = None, turns: str = "first") -> list[str]:
    """Prompts of a jsonl file; turns="all" returns every turn of MT-bench rows (overlap checks)."""
    out: list[str] = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not JSON ({e})") from e
        if isinstance(row, dict) and isinstance(row.get("prompt"), str):
            out.append(row["prompt"])
        elif isinstance(row, dict) and isinstance(row.get("turns"), list) and row["turns"]:
            out.extend(map(str, row["turns"] if turns == "all" else row["turns"][:1]))
        else:
            raise ValueError(f'{path}:{lineno}: expected {{"prompt": ...}} or {{"turns": [...]}}')
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise ValueError(f"{path} holds no prompts")
    return out


def load_categories(path: str | Path, limit: int | None = None) -> list[str | None]:
    """Each prompt's category (its "category" or "kind" field, None if it has none), in
    load_prompts' order (first turns)."""
    out: list[str | None] = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        out.append(row.get("category") or row.get("kind"))
        if limit is not None and len(out) >= limit:
            break
    return out
