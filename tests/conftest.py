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


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the module's tests: the smoke models are tiny, so one thread is as
    fast as several and does not stall when the CPU is shared. Module-scoped, so module fixtures
    that train (a reference run compared bitwise with a resumed one) run under it too; restores the
    thread count, and switches off deterministic algorithms (``deterministic=True`` sets them)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(False)
