#!/usr/bin/env python
"""Install Detectron2 into the current Python environment, if it is not there already.

Detectron2's authors do not publish it on PyPI. The order of preference:

1. ``import detectron2`` already works (for instance a build from source, as Detectron2's
   docs describe): nothing is changed.
2. ``$MFDET_DETECTRON2_SPEC`` is set: it is handed to ``pip install`` as it is
   (a git URL, a local source tree, a wheel file ...).
3. Otherwise detectron2 0.7.2's pure-Python package is taken from the ``sal-detectron2``
   wheel on PyPI. That wheel is tagged for CPython 3.10 and carries a ``_C`` extension
   built for one CUDA torch plus a stray top-level ``tools`` package; both are left out and
   the wheel is re-tagged ``py3-none-any`` before ``pip install --no-deps``. Detectron2's
   Python code runs without ``_C``: only deformable convolution and rotated-box ops need it,
   and this project uses neither.

At the end it prints the Detectron2 version found and whether its ``_C`` extension loads.
"""
import argparse
import base64
import csv
import hashlib
import io
import os
import subprocess
import sys
import tempfile
import zipfile

WHEEL_REQUIREMENT = "sal-detectron2==0.7.2"
SPEC_ENV = "MFDET_DETECTRON2_SPEC"
# The dependencies detectron2's Python code really imports (its wheel declares stricter pins,
# numpy<2 and omegaconf<2.4, that current releases do not need).
RUNTIME_DEPS = [
    "fvcore>=0.1.5", "iopath>=0.1.9", "pycocotools>=2.0.2", "yacs>=0.1.8", "termcolor>=1.1",
    "tabulate", "cloudpickle", "tqdm>4.29.0", "omegaconf>=2.1", "hydra-core>=1.1",
    "matplotlib", "tensorboard", "Pillow>=7.1", "packaging",
]
# Paths inside the wheel that must not be installed.
_DROPPED_PREFIXES = ("tools/",)
_DROPPED_SUFFIXES = (".so",)


class InstallError(RuntimeError):
    pass


def detectron2_status(python):
    """Return ``(version, has_C)`` for detectron2 as seen by ``python``, or None if it does not import."""
    probe = (
        "import detectron2, importlib\n"
        "try:\n    importlib.import_module('detectron2._C'); c = True\n"
        "except Exception:\n    c = False\n"
        "print(detectron2.__version__, c)\n"
    )
    result = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    if result.returncode != 0:
        return None
    version, has_c = result.stdout.split()[-2:]
    return version, has_c == "True"


def _pip(python, *args):
    cmd = [python, "-m", "pip", *args]
    print("+", " ".join(cmd), flush=True)
    result = subprocess.run(cmd)
    if result.returncode != 0:
        raise InstallError(f"'{' '.join(cmd)}' failed with exit code {result.returncode}")


def _record_line(name, data):
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return [name, f"sha256={digest}", str(len(data))]


def retag_wheel(src, dst_dir):
    """Write a ``py3-none-any`` copy of the sal-detectron2 wheel without ``_C`` and ``tools/``.

    Returns the path of the new wheel.
    """
    with zipfile.ZipFile(src) as zin:
        names = zin.namelist()
        dist_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
        dist_name = dist_info[: -len(".dist-info")]
        dst = os.path.join(dst_dir, f"{dist_name}-py3-none-any.whl")
        record_name = f"{dist_info}/RECORD"
        records = []
        with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
            for name in names:
                if name.startswith(_DROPPED_PREFIXES) or name.endswith(_DROPPED_SUFFIXES):
                    continue
                if name == record_name:
                    continue
                data = zin.read(name)
                if name == f"{dist_info}/WHEEL":
                    lines = [
                        line for line in data.decode().splitlines()
                        if not line.startswith(("Tag:", "Root-Is-Purelib:"))
                    ]
                    lines += ["Root-Is-Purelib: true", "Tag: py3-none-any"]
                    data = ("\n".join(lines) + "\n").encode()
                elif name == f"{dist_info}/top_level.txt":
                    data = b"detectron2\n"
                zout.writestr(name, data)
                records.append(_record_line(name, data))
            buf = io.StringIO()
            writer = csv.writer(buf, lineterminator="\n")
            writer.writerows(records + [[record_name, "", ""]])
            zout.writestr(record_name, buf.getvalue())
    return dst


def install_from_wheel(python):
    with tempfile.TemporaryDirectory() as tmp:
        try:
            _pip(python, "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.10",
                 "-d", tmp, WHEEL_REQUIREMENT)
        except InstallError as e:
            raise InstallError(
                f"could not fetch the wheel {WHEEL_REQUIREMENT} from the package index ({e}). "
                f"Install detectron2 yourself (https://detectron2.readthedocs.io/en/latest/tutorials/install.html) "
                f"or set {SPEC_ENV} to a pip requirement for it (a git URL, a source folder, a wheel file)."
            ) from e
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if not wheels:
            raise InstallError(f"pip downloaded no wheel for {WHEEL_REQUIREMENT}")
        fixed = retag_wheel(os.path.join(tmp, wheels[0]), tmp)
        _pip(python, "install", "--no-deps", "--force-reinstall", fixed)
    _pip(python, "install", *RUNTIME_DEPS)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter of the environment to install into (default: this one)")
    args = parser.parse_args(argv)

    status = detectron2_status(args.python)
    if status is not None:
        print(f"detectron2 {status[0]} already importable: left as it is")
    else:
        spec = os.environ.get(SPEC_ENV)
        try:
            if spec:
                _pip(args.python, "install", spec)
            else:
                install_from_wheel(args.python)
        except InstallError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        status = detectron2_status(args.python)
        if status is None:
            print("error: detectron2 still does not import after installation", file=sys.stderr)
            return 1
    version, has_c = status
    print(f"detectron2 {version}; compiled ops (detectron2._C): {'available' if has_c else 'not available (not needed)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
