"""Self-distillation data: the target model's own responses, generated with vLLM, saved as token ids.

Output is a jsonl file, one sequence per line: {"id", "prompt", "prompt_ids", "response_ids"}.
`prompt_ids` is the chat-templated prompt, `response_ids` the model's greedy (or sampled) answer.
Generation runs in chunks and appends each finished chunk, so an interrupted run resumes where it
stopped (ids already in the file are skipped). `<out>.meta.json` records what made the lines (model,
dtype, length, temperature, seed); a resume under other settings is refused with the fix, so one
file never mixes, say, bf16 and fp32 answers, or two seeds' prompt lists under the same ids.

vLLM's CPU engine spawns processes: call `make_data` under an `if __name__ == "__main__":` guard
(the `vllm-ht make-data` console script has one).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..vllm.env import apply_cpu_defaults
from .prompt_set import build_prompts, overlapping

log = logging.getLogger(__name__)


@dataclass
class DistillJob:
    model: str
    out: Path
    prompts: list[str]
    max_tokens: int = 256
    temperature: float = 0.0
    dtype: str = "bfloat16"
    chunk: int = 128          # prompts per vLLM call: large enough to keep the batch full
    max_model_len: int = 2048
    enforce_eager: bool = False
    seed: int = 0
    first: int | None = None  # answer only prompts[:first] (ids unchanged)


def settings(job: DistillJob) -> dict:
    """What decides the lines of a file: a resumed run must use the same."""
    return {"model": Path(job.model).name, "dtype": job.dtype, "max_tokens": job.max_tokens,
            "temperature": job.temperature, "seed": job.seed}


def meta_path(out: Path) -> Path:
    return out.with_name(out.name + ".meta.json")


def check_resume(job: DistillJob, have: dict[int, str]) -> None:
    """Refuse to append to lines made under other settings or for another prompt list (a line's
    prompt must be this run's prompt of the same id); record this run's settings."""
    meta, mine = meta_path(job.out), settings(job)
    other = [i for i, p in have.items() if i >= len(job.prompts) or job.prompts[i] != p]
    if other:
        raise ValueError(f"{job.out}: {len(other)} of its {len(have)} sequences answer other prompts than this "
                         f"run's under the same ids (another --num, --seed or prompt file): resume with the "
                         f"settings that made it, or write to another --out")
    if have and meta.is_file():
        theirs = json.loads(meta.read_text())
        changed = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if changed:
            raise ValueError(f"{job.out} holds {len(have)} sequences made with other settings ({changed}, "
                             f"as made vs asked): resume with the same settings (--dtype / --max-tokens / "
                             f"--temperature / --seed / --model), or write to another --out")
    elif have:
        log.warning("%s: %d sequences without %s: their dtype, length, temperature, seed and model "
                    "are not checked", job.out, len(have), meta.name)
    meta.write_text(json.dumps(mine) + "\n")


def done_prompts(path: Path) -> dict[int, str]:
    """id -> prompt of every complete line already in the file."""
    if not path.is_file():
        return {}
    done = {}
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
                done[row["id"]] = row["prompt"]
            except (json.JSONDecodeError, KeyError):
                break  # a torn last line from an interrupted run: regenerated below
    return done


def _truncate_torn_tail(path: Path) -> None:
    """Drop a partial last line left by a killed run so appends stay valid jsonl."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def run(job: DistillJob, progress: bool = True) -> Path:
    apply_cpu_defaults()
    from vllm import LLM, SamplingParams

    job.out.parent.mkdir(parents=True, exist_ok=True)
    _truncate_torn_tail(job.out)
    have = done_prompts(job.out)
    check_resume(job, have)
    wanted = job.prompts[: job.first]
    todo = [(i, p) for i, p in enumerate(wanted) if i not in have]
    bar = tqdm(total=len(wanted), initial=len(wanted) - len(todo), desc="self-distil",
               unit="seq", disable=not progress)
    if not todo:
        bar.close()
        return job.out
    llm = LLM(model=job.model, dtype=job.dtype, max_model_len=job.max_model_len, seed=job.seed,
              enforce_eager=job.enforce_eager)
    params = SamplingParams(temperature=job.temperature, max_tokens=job.max_tokens, seed=job.seed)
    tokens = 0
    with open(job.out, "a") as f:
        for start in range(0, len(todo), job.chunk):
            chunk = todo[start : start + job.chunk]
            outs = llm.chat([[{"role": "user", "content": p}] for _, p in chunk], params, use_tqdm=False)
            for (i, p), o in zip(chunk, outs):
                resp = list(o.outputs[0].token_ids)
                tokens += len(resp)
                f.write(json.dumps({"id": i, "prompt": p, "prompt_ids": list(o.prompt_token_ids),
                                    "response_ids": resp}) + "\n")
            f.flush()
            bar.update(len(chunk))
            bar.set_postfix(tokens=tokens)
    bar.close()
    return job.out


def training_prompts(num: int, eval_prompts: list[str], seed: int = 0) -> list[str]:
    """The training prompt set, with the overlap check against evaluation prompts enforced."""
    prompts = build_prompts(num, seed=seed)
    bad = overlapping(prompts, eval_prompts)
    if bad:  # build_prompts should never produce these; refuse rather than silently train on eval data
        raise RuntimeError(f"{len(bad)} training prompts overlap the evaluation set, e.g. {bad[0][:80]!r}")
    return prompts
