"""Tools around a vLLM engine or server, run by the CLI, the benchmarks and the tests; not hooks.

- `offline`: one vLLM engine (plain, ngram or HT) over a prompt file, JSON out
  (`python -m vllm_ht.tools.offline`).
- `calibrate`: `vllm-ht calibrate`, this machine's step costs measured in vLLM.
- `loadtest`: an HTTP load generator against a running server (reliability tests, scripts/soak.py).
- `server_metrics`: a running server's `/metrics`, read into one dataclass.
"""
