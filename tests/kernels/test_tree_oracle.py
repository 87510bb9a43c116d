"""The tree oracle: each tree row equals plain causal attention over context + its root-to-node path.

Masks are written by hand (a chain; a small tree with a pseudo group), and the expected output of
every row comes from torch SDPA with is_causal=True over a *linear* sequence [context, path], so
the oracle shares no code with either implementation (its cache gather walks positions one by one).
"""
import pytest
import torch
import torch.nn.functional as nnf

from vllm_ht.kernels.reference import tree_paged_attention_ref
from vllm_ht.kernels.tree_attention_cpu import tree_paged_attention_cpu
from vllm_ht.kernels.testing import TOLERANCES, make_problem
from vllm_ht.kernels.tree_attention import tree_paged_attention


def bool_rows(rows: list[str]) -> torch.Tensor:
    """["1..", "11."] -> [[T, F, F], [T, T, F]]"""
    return torch.tensor([[c == "1" for c in r] for r in rows])


# A chain of 5: root, then each node the child of the previous one.
CHAIN_MASK = ["1....",
              "11...",
              "111..",
              "1111.",
              "11111"]
CHAIN_PATHS = [[0, 1, 2, 3, 4]]      # one root-to-leaf path covers every row

#        0            rows 0..4: tree nodes (window keys 0..4)
#       / \           rows 5..7: pseudo rows of node 3, steps 1..3 (window keys 5..7);
#      1   2          pseudo step s sees node 3's path and pseudo steps <= s
#      |   |
#      3   4
TREE_MASK = ["1.......",
             "11......",
             "1.1.....",
             "11.1....",
             "1.1.1...",
             "11.1.1..",
             "11.1.11.",
             "11.1.111"]
TREE_PATHS = [[0, 1, 3, 5, 6, 7], [0, 2, 4]]   # window key j is row j's own key


def causal_oracle(problem, seq: int, path: list[int]) -> torch.Tensor:
    """fp32 outputs [len(path), num_heads, D] of the rows on `path` (local indices), by causal SDPA."""
    ctx = int(problem.context_lens[seq])
    block_size = problem.kv_cache.shape[2]
    head_dim = problem.query.shape[2]
    group = problem.query.shape[1] // problem.kv_cache.shape[1]
    cached = [problem.kv_cache[int(problem.block_table[seq, p // block_size]), :, p % block_size]
              for p in range(ctx)]                                               # ctx x [Hkv, 2D]
    w0, r0 = int(problem.window_start_loc[seq]), int(problem.query_start_loc[seq])
    keys = torch.stack([kv[:, :head_dim] for kv in cached] + [problem.window_key[w0 + j] for j in path])
    values = torch.stack([kv[:, head_dim:] for kv in cached] + [problem.window_value[w0 + j] for j in path])
    queries = torch.cat([torch.zeros(ctx, *problem.query.shape[1:], dtype=problem.query.dtype),
                         problem.query[[r0 + j for j in path]]])                 # [ctx + len(path), H, D]
    out = nnf.scaled_dot_product_attention(
        queries.float().transpose(0, 1),
        keys.float().transpose(0, 1).repeat_interleave(group, dim=0),
        values.float().transpose(0, 1).repeat_interleave(group, dim=0),
        is_causal=True, scale=problem.scale)                                      # [H, ctx + len(path), D]
    return out.transpose(0, 1)[ctx:]


@pytest.mark.parametrize("impl", [tree_paged_attention, tree_paged_attention_ref, tree_paged_attention_cpu],
                         ids=["triton", "ref", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_equal_causal_attention_over_their_path(impl, dtype):
    # Three sequences in one call: the chain (ctx 18), the tree + pseudo group (ctx 37), and the
    # same tree with an empty cache (ctx 0: the root sees only itself).
    masks = [bool_rows(CHAIN_MASK), bool_rows(TREE_MASK), bool_rows(TREE_MASK)]
    paths = [CHAIN_PATHS, TREE_PATHS, TREE_PATHS]
    problem = make_problem([5, 8, 8], [18, 37, 0], num_heads=9, num_kv_heads=3, dtype=dtype,
                           masks=masks, layout="lbnhc", seed=7)
    out = impl(*problem.args(), torch.full_like(problem.query, float("nan")))
    for seq in range(3):
        r0 = int(problem.query_start_loc[seq])
        covered = set()
        for path in paths[seq]:
            want = causal_oracle(problem, seq, path)
            got = out[[r0 + j for j in path]].float()
            torch.testing.assert_close(got, want, **TOLERANCES[dtype])
            covered.update(path)
        assert covered == set(range(masks[seq].shape[0])), "every row is checked"
