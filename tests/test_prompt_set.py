"""vllm_ht/training/prompt_set.py: the self-distillation prompt set is large, distinct and disjoint from
the evaluation prompts (read by vllm_ht/prompts.py)."""
from pathlib import Path

from vllm_ht.prompts import load_prompts
from vllm_ht.training.distill import training_prompts
from vllm_ht.training.prompt_set import build_prompts, dedupe, overlapping


MT_BENCH = Path(__file__).resolve().parents[1] / "data" / "mt_bench_question.jsonl"


def test_training_set_is_large_distinct_and_disjoint_from_mt_bench():
    evals = load_prompts(MT_BENCH, turns="all")
    assert len(evals) == 160
    prompts = training_prompts(4000, evals)   # raises if anything overlaps
    assert len(prompts) >= 4000 and len(set(prompts)) == len(prompts)
    assert overlapping(prompts, evals) == []
    assert build_prompts(50, seed=1) != build_prompts(50, seed=2)


def test_overlap_check_catches_a_planted_prompt():
    evals = ["Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural experiences."]
    train = ["Explain photosynthesis.", "Please compose an engaging travel blog post about a recent trip to Hawaii now"]
    assert overlapping(train, evals) == [train[1]]


def test_dedupe_ignores_case_and_punctuation():
    assert dedupe(["Explain gravity.", "explain   GRAVITY", "Explain tides."]) == ["Explain gravity.", "Explain tides."]


def test_copy_heavy_requests_are_a_real_share():
    """Translate / answer from a passage / quote / restructure / edit given code: answers that copy
    the prompt, where lookup drafts pay and the pseudo rows must learn to copy."""
    prompts = build_prompts(4000, seed=0)
    kinds = {"translate": "Translate the following passage", "passage question": "Read the passage and answer",
             "quote": "Quote the sentence", "numbered": "Rewrite this text as a numbered list",
             "proofread": "Fix any grammar", "code": "this Python function"}
    counts = {k: sum(1 for p in prompts if v in p) for k, v in kinds.items()}
    assert all(n >= 50 for n in counts.values()), counts
    assert sum(counts.values()) >= 0.15 * len(prompts), counts
    code = next(p for p in prompts if "this Python function" in p)
    assert "\ndef " in code and code.count("\n") >= 6          # the function's source is in the prompt
