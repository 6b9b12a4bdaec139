"""Shared pytest setup: offline guard, the pack as an importable package, tiny model folders.

* At import time (before anything can import huggingface_hub, which reads its settings once at
  import) the Hugging Face libraries are put in offline mode and pointed at a throw-away
  ``HF_HOME``, so a test can neither download nor touch the user's real cache.
* An autouse session fixture makes every non-AF_UNIX socket connect / DNS lookup raise.
* ``pack`` imports the repository's ``__init__.py`` as the package ``qwen_edit_pack`` the way
  ComfyUI imports ``custom_nodes/<folder>/__init__.py`` (relative imports inside the pack work).
* ``tiny_2511_dir`` / ``tiny_2509_dir`` are tiny random-weight diffusers folders built once per
  session from the real classes (see ``tinykit/tiny_pipeline.py``); ``tiny_dir_copy`` is a private
  copy for tests that modify or corrupt files.
* Markers: ``gpu`` (skipped without CUDA) and ``slow``.

torch is imported only inside hooks / fixtures that need it.
"""

from __future__ import annotations

import atexit
import importlib
import os
import shutil
import socket
import sys
import tempfile
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------------------------------
# Import-time environment: must run before huggingface_hub / transformers / diffusers are imported.
# --------------------------------------------------------------------------------------------------

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # makes `tinykit.tiny_pipeline` and `cli` importable

from cli import OFFLINE_ENV, load_pack  # noqa: E402 - the pack is imported the way ComfyUI does, in one place

_HF_HOME = tempfile.mkdtemp(prefix="qwen-edit-tests-hf-home-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)

_OFFLINE_ENV = {
    **OFFLINE_ENV,
    "HF_HOME": _HF_HOME,
    # Explicit cache variables win over HF_HOME, so a user's own settings would leak through.
    "HF_HUB_CACHE": os.path.join(_HF_HOME, "hub"),
    "HF_XET_CACHE": os.path.join(_HF_HOME, "xet"),
    "HF_ASSETS_CACHE": os.path.join(_HF_HOME, "assets"),
}
_LEGACY_CACHE_ENV = ("HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "PYTORCH_TRANSFORMERS_CACHE", "DIFFUSERS_CACHE")

os.environ.update(_OFFLINE_ENV)
for _name in _LEGACY_CACHE_ENV:
    os.environ.pop(_name, None)

if "huggingface_hub" in sys.modules:  # pragma: no cover - only if a plugin imported it first
    # Too late for the environment to be read; force the already-computed constants.
    _hub_constants = sys.modules["huggingface_hub"].constants
    _hub_constants.HF_HUB_OFFLINE = True
    _hub_constants.HF_HUB_DISABLE_TELEMETRY = True
    _hub_constants.HF_HOME = _HF_HOME
    _hub_constants.HF_HUB_CACHE = _OFFLINE_ENV["HF_HUB_CACHE"]


# --------------------------------------------------------------------------------------------------
# Network guard
# --------------------------------------------------------------------------------------------------

_NETWORK_ERROR = "network access in tests is forbidden: {what}"


def _family_of(sock: socket.socket) -> int:
    try:
        return int(sock.family)
    except OSError:  # pragma: no cover - closed socket
        return -1


@pytest.fixture(autouse=True, scope="session")
def _block_network() -> Iterator[None]:
    """Make every IP connection attempt and DNS lookup raise ``RuntimeError`` (AF_UNIX allowed)."""
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def guarded_connect(self: socket.socket, address: Any) -> None:
        if _family_of(self) == getattr(socket, "AF_UNIX", None):
            return real_connect(self, address)
        raise RuntimeError(_NETWORK_ERROR.format(what=f"socket.connect({address!r})"))

    def guarded_connect_ex(self: socket.socket, address: Any) -> int:
        if _family_of(self) == getattr(socket, "AF_UNIX", None):
            return real_connect_ex(self, address)
        raise RuntimeError(_NETWORK_ERROR.format(what=f"socket.connect_ex({address!r})"))

    def guarded_create_connection(address: Any, *args: Any, **kwargs: Any) -> socket.socket:
        raise RuntimeError(_NETWORK_ERROR.format(what=f"socket.create_connection({address!r})"))

    def guarded_getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        raise RuntimeError(_NETWORK_ERROR.format(what=f"socket.getaddrinfo({host!r}, {port!r})"))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", guarded_connect)
        mp.setattr(socket.socket, "connect_ex", guarded_connect_ex)
        mp.setattr(socket, "create_connection", guarded_create_connection)
        mp.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
        yield


# --------------------------------------------------------------------------------------------------
# The pack as a package
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pack() -> types.ModuleType:
    """The pack imported as package ``qwen_edit_pack`` (loaded on first use)."""
    return load_pack()


# --------------------------------------------------------------------------------------------------
# Tiny model folders
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_2511_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen-Image-Edit-2511 diffusers folder (``zero_cond_t=True``), shared by the session.

    Do not modify it; use ``tiny_dir_copy`` for tests that change or corrupt files.
    """
    from tinykit.tiny_pipeline import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("Qwen-Image-Edit-2511-tiny"), zero_cond_t=True)


@pytest.fixture(scope="session")
def tiny_2509_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen-Image-Edit-2509 diffusers folder (``zero_cond_t=False``), shared by the session."""
    from tinykit.tiny_pipeline import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("Qwen-Image-Edit-2509-tiny"), zero_cond_t=False)


@pytest.fixture
def tiny_dir_copy(tiny_2511_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny 2511 folder that the test may modify or corrupt."""
    destination = tmp_path / "Qwen-Image-Edit-2511-tiny-copy"
    shutil.copytree(tiny_2511_dir, destination)
    return destination


@pytest.fixture
def handle(pack: types.ModuleType, tiny_2511_dir: Path) -> Iterator[Any]:
    """A PipeHandle for the tiny 2511 model loaded in float32 on the CPU (bit-exact comparisons)."""
    loader = importlib.import_module(f"{pack.__name__}.loaders.pipeline")
    loader.release_pipeline()
    settings = loader.LoadSettings(str(tiny_2511_dir), precision="float32", device="cpu", quantization="none",
                                   offload="none")
    loader.get_pipeline(settings)
    yield loader.PipeHandle(settings)
    loader.release_pipeline()


@pytest.fixture
def sampler(pack: types.ModuleType) -> Any:
    return pack.NODE_CLASS_MAPPINGS["QwenImageEditSampler"]()


@pytest.fixture
def load_counter(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Records each real ``QwenImageEditPlusPipeline.from_pretrained`` call (a spy: the real load runs)."""
    from diffusers import QwenImageEditPlusPipeline

    calls: list[dict] = []
    real = QwenImageEditPlusPipeline.from_pretrained.__func__

    def spy(cls: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(QwenImageEditPlusPipeline, "from_pretrained", classmethod(spy))
    return calls


@pytest.fixture
def comfyui(pack: types.ModuleType, tmp_path: Path) -> Iterator[dict[str, types.ModuleType]]:
    """ComfyUI's runtime API (see ``tests/comfy_standin.py``) with models under ``tmp_path/models``."""
    from tests import comfy_standin

    bridge = importlib.import_module(f"{pack.__name__}.utils.comfy")
    loader = importlib.import_module(f"{pack.__name__}.loaders.pipeline")
    modules = comfy_standin.install(tmp_path / "models")
    bridge.refresh()
    loader.install_comfy_hooks()
    try:
        yield modules
    finally:
        loader.release_pipeline()
        comfy_standin.uninstall()
        bridge.refresh()


# --------------------------------------------------------------------------------------------------
# Markers
# --------------------------------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped when torch.cuda.is_available() is False")
    config.addinivalue_line("markers", "slow: over ~2.4 s on 2 cores; `pytest -m 'not slow'` is the quick loop")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in gpu_items:
        item.add_marker(skip_gpu)
