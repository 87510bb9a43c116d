"""A test worker whose runner pads every batch, as vLLM's GPU runner does for CUDA graphs.

vLLM's CPU build never pads a batch; the GPU build pads token counts to capture sizes, and there
HT must take the real row count from the attention metadata (not from the padded tensors) and
must write tree positions into the runner's persistent positions buffer (captured graphs read
that buffer). This runner returns a padded batch descriptor from the hook vLLM's own padding goes
through (`_determine_batch_execution_and_padding`), so vLLM's real padding path runs, and checks
on every forward that the positions passed on are the persistent buffer's storage. It counts what
it checked in the step counts the offline tool reports (`step_kinds`), so the test can see it ran.
Used by tests/e2e/test_padding_e2e.py through the offline tool's --worker-cls.
"""
from __future__ import annotations

import dataclasses
from unittest.mock import patch

from vllm.v1.worker import cpu_worker
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

from vllm_ht.vllm.runner import HTRunnerMixin
from vllm_ht.vllm.worker import HTCPUWorker

PAD_TO = 8      # token counts are rounded up to a multiple of this, like capture sizes


class _PersistentPositions(CPUModelRunner):
    """Below HTRunnerMixin in the MRO: sees exactly what the mixin passes to the model."""

    def _model_forward(self, input_ids=None, positions=None, *args, **kwargs):
        if positions is not None and self.ht is not None and self.ht.step is not None:
            ptr = positions.untyped_storage().data_ptr()
            real = self.ht.step.num_real
            if ptr == self.positions.untyped_storage().data_ptr():
                self.ht_step_counts["positions: vLLM's buffer"] += 1
            elif ptr == self._ht_pos.untyped_storage().data_ptr():     # steps with pseudo rows
                self.ht_step_counts["positions: HT's buffer"] += 1
            else:
                raise AssertionError("vllm-ht test: positions passed to the model are not a persistent buffer")
            # tree positions (root + depth) were written into vLLM's own buffer, not into a copy
            if not bool((self.positions[:real] == positions[:real]).all()):
                raise AssertionError("vllm-ht test: the step's positions are not in the runner's persistent buffer")
        return super()._model_forward(input_ids, positions, *args, **kwargs)


class PaddedRunner(HTRunnerMixin, _PersistentPositions):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._ht_setup()

    def _determine_batch_execution_and_padding(self, num_tokens, *args, **kwargs):
        mode, desc, ubatch, across_dp, stats = super()._determine_batch_execution_and_padding(num_tokens, *args,
                                                                                              **kwargs)
        padded = min(-(-num_tokens // PAD_TO) * PAD_TO, self.max_num_tokens)
        return mode, dataclasses.replace(desc, num_tokens=padded), ubatch, across_dp, stats


class PaddedHTWorker(HTCPUWorker):
    def init_device(self):
        with patch.object(cpu_worker, "CPUModelRunner", PaddedRunner):
            CPUWorker.init_device(self)
