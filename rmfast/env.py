"""``rmfast-env``: what was built and what can run here — versions, the compiled extension, and for each
backend and device whether it is usable and, if not, why."""

import importlib.metadata
import json
import platform
import sys


def _version(distribution):
    """The installed version, read from package metadata: importing DeepSpeed would print to stdout."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report():
    """A dict of the facts printed by ``rmfast-env``."""
    import torch

    import rmfast
    from rmfast import _extension, backends

    source, build, why_not = _extension.info()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    usable = {}
    for device in devices:
        for name in backends.BACKENDS:
            reason = backends.unavailable_reason(name, device)
            usable[f"{name}/{device}"] = "ok" if reason is None else reason
    return {
        "rmfast": rmfast.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "none (CPU build)",
        "GPU": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible",
        "triton": _version("triton"),
        "deepspeed": _version("deepspeed"),
        "transformers": _version("transformers"),
        "extension": (f"{source} (CUDA kernels: {'yes' if build.get('with_cuda') else 'no'})"
                      if source else f"missing: {why_not}"),
        "auto backend": {d: backends.select("auto", d) for d in devices},
        "backends": usable,
    }


def main(argv=None):
    from .errors import ArgumentParser

    parser = ArgumentParser(prog="rmfast-env", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    facts = report()
    if args.json:
        json.dump(facts, sys.stdout, indent=2)
        print()
        return 0
    width = max(len(k) for k in facts)
    for key, value in facts.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k:<14} {v}")
        else:
            print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
