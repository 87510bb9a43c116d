"""HTOptions validation: the self-check options."""
import pytest

from vllm_ht.options import HTOptions


def test_self_check_defaults_to_on_without_a_fault():
    opts = HTOptions()
    assert opts.self_check == "on" and opts.test_self_check_fault is None


@pytest.mark.parametrize("fields, needle", [({"self_check": "maybe"}, "self_check='maybe'"),
                                            ({"test_self_check_fault": "pseudo"}, "test_self_check_fault='pseudo'")])
def test_bad_self_check_options_name_the_choices(fields, needle):
    with pytest.raises(ValueError, match="choose one of") as e:
        HTOptions(**fields)
    assert needle in str(e.value)


@pytest.mark.parametrize("mode", ["on", "strict", "off"])
def test_self_check_modes(mode):
    assert HTOptions(self_check=mode, test_self_check_fault="mask").self_check == mode
