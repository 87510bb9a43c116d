"""The gate that skips vLLM CPU-build tests on machines that cannot run them (GPU machines, no vLLM)."""
from pathlib import Path

from vllm_cpu_gate import needs_vllm_cpu, vllm_cpu_unavailable

TESTS = Path(__file__).resolve().parent


def test_which_modules_need_vllms_cpu_build():
    assert needs_vllm_cpu(TESTS / "e2e" / "test_compiled_e2e.py")
    assert needs_vllm_cpu(TESTS / "reliability" / "test_reliability.py")
    assert needs_vllm_cpu(TESTS / "test_step.py") and needs_vllm_cpu(TESTS / "test_cpu_cache_layout.py")
    assert needs_vllm_cpu(TESTS / "test_gpu_path.py")        # vLLM's CPU build stands in for CUDA there
    assert not needs_vllm_cpu(TESTS / "kernels" / "test_tree_attention.py")     # CPU paths run anywhere
    assert not needs_vllm_cpu(TESTS / "test_tree.py")


def test_every_module_importing_vllm_is_gated():
    """A test module importing vLLM (or the hooks that do) outside the gated folders must be listed."""
    import re

    hooks = (r"(runner|attention|worker|model|transfer|lookup|proposer|step|engine_args|launcher|plugin|"
             r"gpu_worker|gpu_attention|self_check|worker_rpc)\b")
    pattern = re.compile(r"^\s*(from|import) (vllm\b|vllm_ht\.vllm\." + hooks + r"|vllm_ht\.vllm import " + hooks + ")",
                         re.M)
    for path in TESTS.rglob("test_*.py"):
        if path.name == "test_docker.py":       # imports vLLM only inside the script it runs in the image
            continue
        if pattern.search(path.read_text()):
            assert needs_vllm_cpu(path), f"{path.relative_to(TESTS)} imports vLLM: add it to NEEDS_VLLM_CPU_FILES"


def test_reasons():
    assert "CUDA GPU" in vllm_cpu_unavailable(cuda_available=True, vllm_installed=True)
    assert "not installed" in vllm_cpu_unavailable(cuda_available=False, vllm_installed=False)
    assert vllm_cpu_unavailable(cuda_available=False, vllm_installed=True) is None
