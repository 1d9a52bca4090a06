import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("MPLBACKEND", "Agg")
# before torch is imported: OpenMP threads sleep rather than spin while waiting (busy CPUs)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest


@pytest.fixture(scope="session")
def smoke_cohort(tmp_path_factory):
    """The embedded synthetic cohort at the smoke preset's size, generated once per test session.

    Returns ``make_cohort_from_config``'s dict: root, tcia_root, tcia_json, btcv_root,
    btcv_json ({N: path}). Tests must not modify these files (copy them first).
    """
    from ssl_utils import get_config
    from ssl_utils.synthetic import make_cohort_from_config

    root = tmp_path_factory.mktemp("smoke_cohort")
    return make_cohort_from_config(get_config("smoke"), str(root), progress=False)
