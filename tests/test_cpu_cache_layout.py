"""The HT CPU backend over vLLM's own KV packing: the start-up probe, and vLLM's native attention
kernel (causal steps) against our planned torch path (tree steps) on the same packed cache."""
import pytest
import torch
from vllm import _custom_ops as ops

from vllm_ht.kernels.cache_layout import K_TRANSPOSED, ROWS, read_slots
from vllm_ht.kernels.tree_attention_cpu import TreeAttentionPlan
from vllm_ht.vllm.attention import _native_halves, native_cache_layout, write_kv
from vllm_ht.vllm.step import causal_blocks, pack_blocks

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 32


@pytest.mark.parametrize("isa", ["vec", "vec16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_probe_recognises_vllm_packing(isa, dtype):
    assert native_cache_layout(isa, dtype, BLOCK, HEAD_DIM) == K_TRANSPOSED


def test_probe_falls_back_to_rows_for_an_isa_it_cannot_run():
    assert native_cache_layout("no-such-isa", torch.float32, BLOCK, HEAD_DIM) == ROWS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_kernel_and_planned_path_agree_on_the_packed_cache(dtype):
    """A prefill chunk and two decodes, written with vLLM's writer (padding slot -1 skipped):
    vLLM's kernel and our plan (causal window mask) read the same packed cache alike."""
    gen = torch.Generator().manual_seed(0)
    q_lens, ctx_lens = [5, 1, 1], [0, 40, 70]
    seq_lens = [q + c for q, c in zip(q_lens, ctx_lens)]
    blocks = 12
    block_table = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]], dtype=torch.int32)
    cache = torch.zeros(blocks, KV_HEADS, BLOCK, 2 * HEAD_DIM, dtype=dtype)
    total = sum(seq_lens)
    key, value = (torch.randn(total, KV_HEADS, HEAD_DIM, generator=gen).to(dtype) for _ in range(2))
    slots = torch.cat([block_table[b, torch.arange(n) // BLOCK].long() * BLOCK + torch.arange(n) % BLOCK
                       for b, n in enumerate(seq_lens)])
    write_kv(cache, torch.cat([key, key[:1]]), torch.cat([value, value[:1]]), torch.cat([slots, torch.tensor([-1])]),
             K_TRANSPOSED, "vec")
    assert torch.equal(read_slots(cache, slots, K_TRANSPOSED)[:, :, :HEAD_DIM], key)

    starts = torch.tensor([0] + seq_lens).cumsum(0)
    rows = torch.cat([torch.arange(int(starts[b]) + c, int(starts[b + 1])) for b, c in enumerate(ctx_lens)])
    query = torch.randn(rows.numel(), HEADS, HEAD_DIM, generator=gen).to(dtype)
    qsl = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)

    native = torch.empty_like(query)
    md = ops.cpu_attn_get_scheduler_metadata(num_reqs=3, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                                             seq_lens=lens, dtype=dtype, query_start_loc=qsl, causal=True,
                                             sliding_window_size=-1, isa="vec", enable_kv_split=False)
    ops.cpu_attention_with_kv_cache(query=query, key_cache=_native_halves(cache)[0],
                                    value_cache=_native_halves(cache)[1], output=native, query_start_loc=qsl,
                                    seq_lens=lens, scale=HEAD_DIM ** -0.5, causal=True, alibi_slopes=None,
                                    sliding_window=-1, block_table=block_table, softcap=0.0,
                                    scheduler_metadata=md, s_aux=None)
    args = (query, cache, block_table, torch.tensor(ctx_lens, dtype=torch.int32), qsl, key[rows], value[rows], qsl,
            pack_blocks(causal_blocks(q_lens)))
    planned = TreeAttentionPlan.build(*args, cache_layout=K_TRANSPOSED).run(query, cache, key[rows], value[rows],
                                                                            HEAD_DIM ** -0.5)
    tol = {"atol": 2e-5, "rtol": 2e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(native, planned, **tol)


def test_probe_falls_back_when_an_isa_packs_otherwise(monkeypatch):
    """An ISA that runs but packs the cache another way (as AMX tiles do for bf16) must read as
    ROWS, and ht_native_isa must then take the first fallback ISA that packs K_TRANSPOSED, or none."""
    from vllm_ht.vllm import attention

    real = ops.cpu_attn_reshape_and_cache

    def tiled(key, value, k_cache, v_cache, slots, isa):       # "tiled": like vec, then pairs swapped
        real(key, value, k_cache, v_cache, slots, "vec")
        if isa == "tiled":
            k_cache.copy_(k_cache.flip(-1))

    monkeypatch.setattr(attention.ops, "cpu_attn_reshape_and_cache", tiled)
    assert native_cache_layout("tiled", torch.bfloat16, BLOCK, HEAD_DIM) == ROWS
    assert attention.ht_native_isa("tiled", torch.bfloat16, BLOCK, HEAD_DIM) == "vec"
    monkeypatch.setattr(attention, "FALLBACK_ISAS", ("tiled",))
    assert attention.ht_native_isa("tiled", torch.bfloat16, BLOCK, HEAD_DIM) is None
