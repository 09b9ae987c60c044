"""Shared test configuration: CUDA skipping, tolerances, the shared data folder."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# ../shared/data beside the project root holds artifacts of the original work (optional).
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ACD_MNIST_WEIGHTS = SHARED_DATA / "acd_mnist_cnn.pt"

# One tolerance table keyed by dtype (style.md item 7): (rtol, atol relative to the output scale).
# float32 atol is 1e-4 of the scale: CD logits of random-init nets are sums with heavy
# cancellation (AlexNet's float32 engine differs from the float64 oracle by 3e-5 of the scale).
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.float64: (1e-10, 1e-10)}


def cpu_and_cuda():
    return ("cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda))


def pytest_addoption(parser):
    parser.addoption("--zoo", action="store_true",
                     help="run the whole model zoo (tests/test_zoo.py, marked zoo; or FASTACD_ZOO=1)")


def pytest_collection_modifyitems(config, items):
    if not (config.getoption("--zoo") or os.environ.get("FASTACD_ZOO") == "1"):
        skip_zoo = pytest.mark.skip(reason="the whole model zoo runs with --zoo or FASTACD_ZOO=1")
        for item in items:
            if "zoo" in item.keywords:
                item.add_marker(skip_zoo)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "needs_cuda" in item.keywords:
            item.add_marker(skip)


def assert_cdep_matches_reference(model, x, masks):
    """The CDEP penalty and its parameter gradients from the fast paired pass equal the
    reference backend's (float64), and the gradients are not all zero."""
    from fastacd import cdep
    values = []
    for backend in ("reference", None):
        pen = cdep.CDEPPenalty(model, **({"backend": backend, "reuse_forward": False} if backend else {}))
        model.zero_grad()
        loss = pen(x, masks)
        loss.backward()
        values.append((loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
        pen.remove_hooks()
    (p_ref, g_ref), (p, g) = values
    assert g_ref.abs().sum() > 0
    torch.testing.assert_close(p, p_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-10)


def assert_close_scaled(actual, expected, dtype):
    """assert_close with the dtype's rtol and an atol scaled by the magnitude of ``expected``."""
    rtol, atol = TOLERANCES[dtype]
    scale = max(float(expected.detach().abs().max()), 1e-30)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: tiny convolutions run fastest on one, and a shared
    2-core machine is not oversubscribed (use as ``pytestmark = usefixtures("one_thread")``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def acd_mnist_weights():
    if not ACD_MNIST_WEIGHTS.exists():
        pytest.skip(f"{ACD_MNIST_WEIGHTS} not present (shared data of the original work)")
    return ACD_MNIST_WEIGHTS
