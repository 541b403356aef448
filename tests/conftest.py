"""Shared test fixtures: the reference package ``video-diffusion-pytorch`` (0.6.3 and 0.7.0).

Both versions install the module name ``video_diffusion_pytorch`` (0.7.0 under ``.venv/ref-0.7.0``), and
both import torchvision at import time, which cannot be installed beside the CPU torch. The loader stubs
torchvision only while the package imports and then restores ``sys.modules``, so other tests (and
libraries probing for torchvision with ``importlib.util.find_spec``) never see the stub.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
import types
from pathlib import Path

import pytest

REF_070_DIR = Path(sys.prefix) / "ref-0.7.0"

_cache: dict[str, types.ModuleType] = {}


class _AnyAttr(types.ModuleType):
    """A stand-in module whose every attribute is a do-nothing callable (``T.ToTensor()`` etc.)."""

    def __getattr__(self, name):
        if name.startswith("__"):  # module machinery (__file__, __path__, ...) must look absent
            raise AttributeError(name)
        return lambda *args, **kwargs: None


def load_reference(version: str = "0.6.3") -> types.ModuleType:
    """Import ``video_diffusion_pytorch`` of the given version and return its main module.

    Skips the calling test when that version is not installed.
    """
    if version in _cache:
        return _cache[version]
    path = None
    if version == "0.7.0":
        if not (REF_070_DIR / "video_diffusion_pytorch").is_dir():
            pytest.skip(f"video-diffusion-pytorch 0.7.0 is not installed in {REF_070_DIR}")
        path = str(REF_070_DIR)
    saved = {k: v for k, v in sys.modules.items() if k == "video_diffusion_pytorch" or k.startswith("video_diffusion_pytorch.")}
    for k in saved:
        del sys.modules[k]
    had_tv = {k: sys.modules.get(k) for k in ("torchvision", "torchvision.transforms", "torchvision.utils")}
    tv = types.ModuleType("torchvision")
    tv.transforms, tv.utils = _AnyAttr("torchvision.transforms"), _AnyAttr("torchvision.utils")
    sys.modules.update({"torchvision": tv, "torchvision.transforms": tv.transforms, "torchvision.utils": tv.utils})
    if path:
        sys.path.insert(0, path)
    try:
        module = importlib.import_module("video_diffusion_pytorch.video_diffusion_pytorch")
    except ImportError as e:
        pytest.skip(f"video-diffusion-pytorch {version} cannot be imported: {e}")
    finally:
        if path:
            sys.path.remove(path)
        for k, v in had_tv.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
        for k in [k for k in sys.modules if k == "video_diffusion_pytorch" or k.startswith("video_diffusion_pytorch.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    installed = getattr(module, "__file__", "")
    assert (path is None) == ("ref-0.7.0" not in installed), f"loaded the wrong reference: {installed}"
    _cache[version] = module
    return module


@pytest.fixture(scope="session")
def ref_vdp() -> types.ModuleType:
    """video_diffusion_pytorch 0.6.3 (GroupNorm), as installed from PyPI."""
    return load_reference("0.6.3")


@pytest.fixture(scope="session")
def ref_vdp070() -> types.ModuleType:
    """video_diffusion_pytorch 0.7.0 (RMSNorm in Block), from ``.venv/ref-0.7.0``."""
    return load_reference("0.7.0")


@pytest.fixture(autouse=True, scope="session")
def _private_vdeploy_cache(tmp_path_factory):
    """Engine and optimized-graph caches go to a folder of the test session, never the user's ~/.cache."""
    import os

    saved = os.environ.get("VDEPLOY_CACHE")
    os.environ["VDEPLOY_CACHE"] = str(tmp_path_factory.mktemp("vdeploy-cache"))
    # auto keeps the table's order unless a test measures (tests/test_runtime_ranking.py): no timing decides a test
    os.environ.setdefault("VDEPLOY_AUTO_MEASURE", "0")
    yield
    if saved is None:
        os.environ.pop("VDEPLOY_CACHE", None)
    else:
        os.environ["VDEPLOY_CACHE"] = saved


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tests run tiny tensors: one torch thread is faster, and far faster on a busy 2-core machine,
    where a second OpenMP thread waits on the other core (measured 5-10x slower under load)."""
    torch = sys.modules.get("torch")
    if torch is None:  # the runtime's tests never import torch; importing it here would cost them
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_addoption(parser):
    parser.addoption(
        "--reliability-full", action="store_true", default=False,
        help="tests/reliability in full mode: 20 training kills instead of 5, ten times the generated bad inputs",
    )


# CI fails on any skip but those that need hardware this machine cannot have: a test skipped because a
# package is missing means `make install` left out something a user relies on (issue: Ray and MP4 tests were
# skipped in every CI run). Set VDEPLOY_ALLOW_SKIPS=1 to run a subset of the suite without the check.
_HARDWARE_SKIP = re.compile(r"tensorrt|cuda|gpu|nvidia", re.IGNORECASE)
_unexpected_skips: list[tuple[str, str]] = []


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not (_HARDWARE_SKIP.search(reason) or _HARDWARE_SKIP.search(" ".join(report.keywords))):
            _unexpected_skips.append((report.nodeid, reason))


def pytest_sessionfinish(session, exitstatus):
    if _unexpected_skips and not os.environ.get("VDEPLOY_ALLOW_SKIPS") and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _unexpected_skips and not os.environ.get("VDEPLOY_ALLOW_SKIPS"):
        terminalreporter.section("unexpected skips (only TensorRT/GPU tests may skip; VDEPLOY_ALLOW_SKIPS=1 allows)")
        for nodeid, reason in _unexpected_skips:
            terminalreporter.write_line(f"{nodeid}: {reason}")
