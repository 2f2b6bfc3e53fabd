"""Importing any awqkit module shortens libgomp's spin before torch loads it (a value the user set
is kept), and light modules stay light."""

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("users, expected", [(None, "10000"), ("300000", "300000")])
def test_gomp_spincount_is_set_before_torch_loads_unless_the_user_set_it(users, expected):
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    if users is not None:
        env["GOMP_SPINCOUNT"] = users
    probe = "import sys, os, awqkit.quant.grid; assert 'torch' in sys.modules; print(os.environ['GOMP_SPINCOUNT'])"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


def test_the_config_loads_at_most_five_awqkit_modules_and_no_torch():
    probe = "import sys, awqkit.config; print(' '.join(m for m in sys.modules if m.startswith(('awqkit', 'torch'))))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert not any(m == "torch" or m.startswith("torch.") for m in loaded), loaded
    assert len(loaded) <= 5, loaded


def test_the_public_api_is_reachable_from_the_package():
    import awqkit
    from awqkit.config import QuantizeConfig
    from awqkit.pipeline import quantize, quantize_model

    assert (awqkit.quantize, awqkit.quantize_model, awqkit.QuantizeConfig) == (quantize, quantize_model, QuantizeConfig)
