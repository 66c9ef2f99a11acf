"""Every tutorial runs top to bottom with small settings (CI=1), and every tutorial is registered."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPECTED = {
    "eight_schools.py": "saved and reloaded",
    "theophylline.py": "done: outputs in",
    "anomaly_detection.py": "done",
    "imputation.py": "done",
    "generative_classifier.py": "done",
    "forecasting.py": "done",
    "digits_vae.py": "done",
    "latent_ode_pk.py": "done",
    "flows_two_moons.py": "done",
}
TUTORIALS = sorted(EXPECTED)


def test_every_tutorial_is_registered():
    found = sorted(p.name for p in (ROOT / "tutorials").glob("*.py"))
    assert found == sorted(TUTORIALS), f"register new tutorials in TUTORIALS: {found}"


@pytest.mark.parametrize("name", TUTORIALS)
def test_tutorial_runs(name, tmp_path):
    env = dict(os.environ, CI="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "tutorials" / name)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert EXPECTED[name] in proc.stdout
