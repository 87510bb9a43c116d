# syntax=docker/dockerfile:1
# vllm-ht on vLLM's official CUDA image (vLLM 0.32): the plugin and the shipped checkpoint.
#
#   docker build -t vllm-ht:gpu .
#   docker run --gpus all --ipc=host -p 8000:8000 vllm-ht:gpu MODEL \
#       --speculative-model hidden_transfer --ht-checkpoint /opt/vllm-ht/checkpoints/smollm2-135m-instruct
#
# NOTE: the GPU worker of vllm-ht is not written yet. On a GPU, `--speculative-model
# hidden_transfer` stops at start-up with that message (worker_cls in vllm_ht/vllm/engine_args.py);
# today this image builds and serves plain vLLM with the plugin loaded:
#   docker run --gpus all --ipc=host -p 8000:8000 vllm-ht:gpu MODEL
# Hidden Transfer runs on vLLM's CPU build: docker/cpu.Dockerfile.
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
