"""The shared argument checks and the one "device of a module" helper."""

import numpy as np
import pytest
import torch

from costaware._torch import device_of
from costaware.validation import check_amount, check_count, check_flag, check_path, check_text, is_number


def test_one_check_for_amounts_and_counts():
    assert check_amount("alpha", 1, maximum=1) == 1.0 and check_amount("x", None, allow_none=True) is None
    with pytest.raises(ValueError, match=r"confidence must be > 0.0 and < 1, got 1"):
        check_amount("confidence", 1, strict=True, maximum=1, strict_maximum=True)
    with pytest.raises(ValueError, match=r"alpha must be a finite number >= 0.0 and <= 1, got inf"):
        check_amount("alpha", float("inf"), maximum=1)
    assert check_count("k", 3, minimum=1) == 3 and check_count("every", None, minimum=1, allow_none=True) is None
    for bad in (0, True, 2.0, "3"):
        with pytest.raises(ValueError, match=r"k must be an int >= 1, got "):
            check_count("k", bad, minimum=1)


def test_a_number_is_never_a_bool():
    """JSON's true and Python's True pass isinstance(x, int); every check of a number (records, priors, the
    policy's arguments) refuses them through this one helper."""
    assert all(is_number(v) for v in (0, 1.5, float("nan"), np.float32(2.0), np.int64(3)))
    assert not any(is_number(v) for v in (True, False, None, "1", [1], np.bool_(True)))


def test_text_paths_and_flags_name_the_argument_and_what_it_accepts(tmp_path):
    assert check_text("gpu", "H100", "a GPU model") == "H100" and check_text("gpu", None, "a GPU model") is None
    with pytest.raises(ValueError, match=r"gpu must be a GPU model or None, got 123"):
        check_text("gpu", 123, "a GPU model")
    assert check_path("ledger_dir", tmp_path) == tmp_path and check_path("ledger_dir", "runs") == "runs"
    for bad in (123, "", "  ", b"runs", ["runs"]):
        with pytest.raises(ValueError, match=r"ledger_dir must be a folder path \(a non-empty str or pathlib.Path\)"):
            check_path("ledger_dir", bad)
    with pytest.raises(ValueError, match="ledger_dir must be a folder path"):
        check_path("ledger_dir", None, allow_none=False)
    assert check_flag("verbose", False) is False
    for bad in (0, 1, "yes", None):
        with pytest.raises(ValueError, match=r"verbose must be True or False, got "):
            check_flag("verbose", bad)


def test_device_of_reads_parameters_then_buffers_else_the_cpu():
    assert device_of(torch.nn.Linear(2, 2).to("meta")) == torch.device("meta")
    buffers_only = torch.nn.BatchNorm1d(2, affine=False).to("meta")
    assert list(buffers_only.parameters()) == [] and device_of(buffers_only) == torch.device("meta")
    assert device_of(torch.nn.ReLU()) == torch.device("cpu")
    assert device_of(torch.nn.Linear(2, 2)) == torch.device("cpu")

