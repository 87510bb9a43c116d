"""Packed per-row window masks: which of this step's window keys each query row may see.

Glossary (shared by every module in `vllm_ht/kernels/`):
- row: one query vector per head; the rows of sequence b are `query[qsl[b]:qsl[b+1]]`.
- context: the sequence's cached tokens, positions 0..ctx-1, read through the block table;
  every row of the sequence sees all of them.
- window key: one of this step's extra keys (tree rows, pseudo rows) passed beside the cache and
  never read from it; the window keys of sequence b are `window_key[wsl[b]:wsl[b+1]]`, and local
  window index j of b means `window_key[wsl[b] + j]`.
- window mask: int32 `[num_rows, num_words]`, num_words = ceil(max_window_per_seq / 32). Bit j % 32
  of word j // 32 in row r is set when row r sees local window key j. Bits past the sequence's
  window count are ignored.

Worked example (one sequence, a root and two children, W = 3 window keys):
    bool mask                  packed (one word per row)
    row 0 (root):   [T, F, F]  -> [0b001] = [1]
    row 1 (child):  [T, T, F]  -> [0b011] = [3]
    row 2 (child):  [T, F, T]  -> [0b101] = [5]
Key 31 of a row sets the sign bit: bool row with only j = 31 set packs to [-2147483648].
"""
import torch

BITS_PER_WORD = 32


def num_mask_words(max_window: int) -> int:
    """Words per row for `max_window` window keys: 0 -> 0, 1..32 -> 1, 33 -> 2."""
    return (max_window + BITS_PER_WORD - 1) // BITS_PER_WORD


def pack_window_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool `[rows, W]` -> int32 `[rows, ceil(W / 32)]`, bit j % 32 of word j // 32 = mask[:, j].

    Example: [[T, F, T], [F, F, F]] -> [[5], [0]];  a row of 33 True -> [-1, 1].
    """
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a 2-D bool tensor, got {mask.dtype} of shape {tuple(mask.shape)}")
    rows, width = mask.shape
    words = num_mask_words(width)
    padded = torch.zeros(rows, words * BITS_PER_WORD, dtype=torch.int64, device=mask.device)
    padded[:, :width] = mask.to(torch.int64)
    weights = torch.ones(BITS_PER_WORD, dtype=torch.int64, device=mask.device) << torch.arange(
        BITS_PER_WORD, device=mask.device)                                # [32]: 1, 2, 4, ..., 2**31
    unsigned = (padded.view(rows, words, BITS_PER_WORD) * weights).sum(-1)  # [rows, words] in [0, 2**32)
    # NOTE: reinterpret as two's-complement int32 by hand; a plain int64 -> int32 cast of values
    # >= 2**31 is not guaranteed to wrap on every device.
    signed = torch.where(unsigned >= 2**31, unsigned - 2**32, unsigned)
    return signed.to(torch.int32)


def unpack_window_mask(bits: torch.Tensor, width: int) -> torch.Tensor:
    """int32 `[rows, words]` -> bool `[rows, width]`, the inverse of `pack_window_mask`.

    Example: [[5], [0]] with width 3 -> [[T, F, T], [F, F, F]]; width may be < 32 * words.
    """
    if bits.dim() != 2 or bits.dtype != torch.int32:
        raise ValueError(f"bits must be a 2-D int32 tensor, got {bits.dtype} of shape {tuple(bits.shape)}")
    if width > bits.shape[1] * BITS_PER_WORD:
        raise ValueError(f"width {width} needs {num_mask_words(width)} words, bits has {bits.shape[1]}")
    j = torch.arange(width, device=bits.device)                            # [width]
    words = bits[:, j // BITS_PER_WORD]                                    # [rows, width]
    # Arithmetic shift of a negative word still leaves the wanted bit in position 0.
    return ((words >> (j % BITS_PER_WORD)) & 1).bool()
