"""The one door to the compiled extension (``rmfast._C``): the rest of rmfast calls ``load()`` and then
``torch.ops.rmfast.*``.

Order: the module built by ``pip install`` (``rmfast._C``); if it is absent, a JIT build of ``csrc/`` through
``torch.utils.cpp_extension.load`` (ninja; cached in TORCH_EXTENSIONS_DIR, a minute or two the first time).

RMFAST_EXTENSION (read here, once) picks the order: ``auto`` (default: compiled, then JIT), ``compiled``,
``jit`` or ``none``.
"""

import os
import threading
from pathlib import Path

_lock = threading.Lock()
_state = {"loaded": False, "module": None, "source": None, "why_not": None}


def _csrc_dir():
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):  # regular install, then source checkout
        if (candidate / "bindings.cpp").exists():
            return candidate
    return None


def _jit_build():
    from ._toolchain import find_cuda_home

    cuda_home = find_cuda_home()
    if cuda_home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at its first import
    import torch
    from torch.utils import cpp_extension

    csrc = _csrc_dir()
    if csrc is None:
        raise RuntimeError("the csrc/ sources are not shipped with this install")
    sources = [str(csrc / "bindings.cpp"), str(csrc / "pairwise_loss_cpu.cpp")]
    cflags = ["-O3", "-fopenmp-simd"]
    kwargs = {}
    if torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None:
        sources.append(str(csrc / "pairwise_loss_cuda.cu"))
        cflags.append("-DRMFAST_WITH_CUDA")
        kwargs["extra_cuda_cflags"] = ["-O3", "--use_fast_math", "-DRMFAST_WITH_CUDA"]
    return cpp_extension.load(
        name="rmfast_C_jit", sources=sources, extra_cflags=cflags, extra_include_paths=[str(csrc)], **kwargs
    )


def load():
    """Return the loaded extension module (its ops are then in ``torch.ops.rmfast``), or None."""
    if _state["loaded"]:
        return _state["module"]
    with _lock:
        if _state["loaded"]:
            return _state["module"]
        mode = os.environ.get("RMFAST_EXTENSION", "auto").lower()
        reasons = []
        if mode in ("auto", "compiled"):
            try:
                from rmfast import _C

                _state.update(module=_C, source="compiled")
            except ImportError as exc:
                reasons.append(f"rmfast._C not importable ({exc}); build it with "
                               f"`pip install --no-build-isolation -e .`")
        if _state["module"] is None and mode in ("auto", "jit"):
            try:
                _state.update(module=_jit_build(), source="jit")
            except Exception as exc:  # a failed JIT build must not break `import rmfast`
                reasons.append(f"JIT build failed: {type(exc).__name__}: {str(exc).strip().splitlines()[-1:]}")
        if mode == "none":
            reasons.append("RMFAST_EXTENSION=none")
        elif mode not in ("auto", "compiled", "jit"):
            reasons.append(f"RMFAST_EXTENSION={mode!r} is not one of auto, compiled, jit, none")
        if _state["module"] is None:
            _state["why_not"] = "; ".join(reasons)
        _state["loaded"] = True
        return _state["module"]


def info():
    """(source, build_info dict, why_not): where the extension came from and what it contains."""
    module = load()
    if module is None:
        return None, {}, _state["why_not"]
    return _state["source"], dict(module.build_info()), None
