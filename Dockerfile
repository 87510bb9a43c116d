# syntax=docker/dockerfile:1
# vllm-ht on vLLM's official CUDA image (vLLM 0.32): the plugin and the shipped checkpoint.
#
#   docker build -t vllm-ht:gpu .
#   docker run --gpus all --ipc=host -p 8000:8000 vllm-ht:gpu MODEL \
#       --speculative-model hidden_transfer --ht-checkpoint /opt/vllm-ht/checkpoints/smollm2-135m-instruct
#
# NOTE: this image serves Hidden Transfer with the GPU worker (vllm_ht/vllm/gpu_worker.py: vLLM's V1
# GPU runner, and the HT attention backend in vLLM's CUSTOM slot, vllm_ht/vllm/gpu_attention.py:
# TRITON_ATTN for causal rows, the project's Triton tree kernel for tree and pseudo rows; piecewise
# CUDA graphs only). This path has not been run end to end: no vLLM CUDA build could be run by the
# project. It is checked in pieces on CPU (tests/test_gpu_path.py: backend registration and
# validation, the CUDA-graph decisions, the metadata builder, worker selection), by the start-up
# self-check (vllm_ht/vllm/self_check.py) and by scripts/device_check.py (the kernels on a GPU,
# without vLLM). Without --speculative-model the image serves plain vLLM with the plugin loaded:
#   docker run --gpus all --ipc=host -p 8000:8000 vllm-ht:gpu MODEL
# The CPU build of Hidden Transfer, tested end to end: docker/cpu.Dockerfile.
FROM vllm/vllm-openai:v0.32.0

WORKDIR /opt/vllm-ht
COPY . .

# The image's vLLM, torch and transformers already satisfy setup.py's pins (the [gpu] extra is
# vllm>=0.32,<0.33), so uv adds only what the image lacks and leaves the CUDA stack alone; the
# check after it fails the build if vLLM changed or the plugin entry point is missing.
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip install --system ".[gpu]" \
    && python3 -c "import importlib.metadata as m; v = m.version('vllm'); assert v.startswith('0.32.'), v; \
eps = m.entry_points(group='vllm.general_plugins'); \
assert any(e.name == 'vllm_ht' for e in eps), 'vllm_ht plugin not registered'"

EXPOSE 8000
# The base image's entrypoint, stated here: arguments to `docker run` follow `vllm serve`.
ENTRYPOINT ["vllm", "serve"]
