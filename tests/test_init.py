"""Importing awqkit before torch shortens libgomp's spin (set before torch loads it); a value the
user set is kept."""

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("users, expected", [(None, "10000"), ("300000", "300000")])
def test_gomp_spincount_is_set_before_torch_loads_unless_the_user_set_it(users, expected):
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    if users is not None:
        env["GOMP_SPINCOUNT"] = users
    probe = "import sys, awqkit, os; assert 'torch' in sys.modules; print(os.environ['GOMP_SPINCOUNT'])"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected
