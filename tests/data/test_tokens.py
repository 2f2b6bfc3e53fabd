import pytest
import torch

from awqkit.data.tokens import calibration_windows, cut_windows


def test_windows_are_seeded_and_bos_led():
    ids = torch.arange(1000)
    a = calibration_windows(ids, 5, 64, seed=1, bos_id=7)
    assert torch.equal(a, calibration_windows(ids, 5, 64, seed=1, bos_id=7))
    assert not torch.equal(a, calibration_windows(ids, 5, 64, seed=2, bos_id=7))
    assert (a[:, 0] == 7).all() and a.shape == (5, 64)
    assert torch.equal(cut_windows(ids, 10, None)[3], torch.arange(30, 40))
    with pytest.raises(ValueError, match="too short"):
        calibration_windows(ids, 100, 64, seed=1, bos_id=None)
