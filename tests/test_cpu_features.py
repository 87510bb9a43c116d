"""Native bf16 detection from /proc/cpuinfo, the serving dtype it picks, and the warning."""
import subprocess
import sys

from vllm_ht.cpu_features import bf16_warning, cpu_flags, native_bf16, serving_dtype, with_serving_dtype

AVX2 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse sse2 avx avx2 fma\n\nprocessor\t: 1\n"
AMX = "processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n"
S390X = "vendor_id       : IBM/S390\nfeatures\t: esan3 zarch stfle msa ldisp eimm dfp edat etf3eh highgprs te vx\n"


def _file(tmp_path, text):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return path


def test_flags_and_dtype_per_cpu(tmp_path):
    for name, text, native in (("avx2", AVX2, False), ("amx", AMX, True), ("arm", ARM_BF16, True)):
        (tmp_path / name).mkdir()
        path = _file(tmp_path / name, text)
        assert native_bf16(path) is native
        assert serving_dtype(path) == ("bfloat16" if native else "float32")
    assert "avx2" in cpu_flags(tmp_path / "avx2" / "cpuinfo")


def test_unknown_cpu_claims_nothing(tmp_path):
    missing = tmp_path / "none"
    assert cpu_flags(missing) is None and native_bf16(missing) is None
    assert serving_dtype(missing) == "bfloat16" and bf16_warning("bfloat16", missing) is None
    no_flags = _file(tmp_path, "processor\t: 0\n")
    assert native_bf16(no_flags) is None
    (tmp_path / "s390x").mkdir()
    other_isa = _file(tmp_path / "s390x", S390X)
    assert cpu_flags(other_isa) and native_bf16(other_isa) is None and serving_dtype(other_isa) == "bfloat16"


def test_warning_names_the_problem_and_the_fix(tmp_path):
    avx2 = _file(tmp_path, AVX2)
    text = bf16_warning("torch.bfloat16", avx2)
    assert "no native bf16" in text and "--dtype float32" in text
    assert bf16_warning("torch.float32", avx2) is None
    (tmp_path / "amx").mkdir()
    assert bf16_warning("bfloat16", _file(tmp_path / "amx", AMX)) is None


def test_cli_prints_this_machines_dtype():
    out = subprocess.run([sys.executable, "-m", "vllm_ht.cli", "runtime", "--dtype"], capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == serving_dtype()


def test_serve_picks_fp32_only_without_a_dtype_on_the_cpu_build_of_a_cpu_without_bf16(tmp_path, capsys):
    avx2 = _file(tmp_path, AVX2)
    args = ["MODEL", "--speculative-model", "hidden_transfer"]
    assert with_serving_dtype(args, cpu_build=True, cpuinfo=avx2) == [*args, "--dtype", "float32"]
    assert "float32" in capsys.readouterr().err
    for given in (["--dtype", "bfloat16"], ["--dtype=bfloat16"]):        # the user's choice stands
        assert with_serving_dtype([*args, *given], cpu_build=True, cpuinfo=avx2) == [*args, *given]
    assert with_serving_dtype(args, cpu_build=False, cpuinfo=avx2) == args     # CUDA build: the GPU decides
    (tmp_path / "amx").mkdir()
    assert with_serving_dtype(args, cpu_build=True, cpuinfo=_file(tmp_path / "amx", AMX)) == args


def test_make_data_answers_in_this_cpus_dtype(tmp_path):
    """make-data's training set: fp32 on vLLM's CPU build without native bf16 (bf16 generation ran
    ~5x slower there), bf16 where it is native, unknown, or on another vLLM build."""
    from vllm_ht.cpu_features import training_dtype

    for name, text, cpu_build, want in (("avx2", AVX2, True, "float32"), ("amx", AMX, True, "bfloat16"),
                                        ("s390x", S390X, True, "bfloat16"), ("gpu", AVX2, False, "bfloat16")):
        (tmp_path / name).mkdir()
        assert training_dtype(cpu_build, _file(tmp_path / name, text)) == want, name
