"""Session fixtures of the end-to-end tests."""
import pytest
from e2e_helpers import REFERENCE_ARGS, run_engine


@pytest.fixture(scope="session")
def plain_reference(model_dir, tmp_path_factory) -> dict:
    """One plain vLLM engine (fp32, eager, one process) for the whole session: the greedy tokens the
    HT engines of the offline, compiled, padding, default-policy, self-check and tensor-parallel
    tests must reproduce (e2e_helpers.plain_greedy). One engine instead of one per test file: each
    costs ~15 s of start-up plus its decoding on 2 cores."""
    return run_engine(model_dir, tmp_path_factory.mktemp("reference") / "plain.json", *REFERENCE_ARGS)
