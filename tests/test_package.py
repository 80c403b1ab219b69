"""The package registers its components; the Detectron2 installer keeps what is there and fails clearly."""
import os
import subprocess
import sys
import zipfile

import pytest

from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))
import install_detectron2  # noqa: E402


def test_import_registers_backbone_and_meta_architecture():
    from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY

    import mobileformer_det  # noqa: F401
    assert "build_mobileformer_backbone" in BACKBONE_REGISTRY
    assert "MFDETR" in META_ARCH_REGISTRY


def test_every_config_loads_with_the_project_keys():
    from detectron2.config import get_cfg

    from mobileformer_det import add_mobileformer_config

    variants = {}
    for name in sorted(os.listdir(os.path.join(ROOT, "configs"))):
        if name.startswith("mf_detr"):
            cfg = get_cfg()
            add_mobileformer_config(cfg)
            cfg.merge_from_file(os.path.join(ROOT, "configs", name))
            assert cfg.MODEL.META_ARCHITECTURE == "MFDETR"
            d = cfg.MODEL.MF_DETR
            variants[name] = (cfg.MODEL.MOBILEFORMER.VARIANT, d.HIDDEN_DIM, d.DECODER.DIM_FEEDFORWARD, d.DECODER.NUM_LAYERS)
    # The COCO recipes follow the decoder-size rule written in Base-MF-DETR.yaml.
    assert variants["mf_detr.yaml"] == ("mf508", 256, 1024, 6)
    assert {variants[f"mf_detr_{v}m.yaml"] for v in (26, 52, 96, 151, 214, 294)} == {
        ("mf294", 256, 1024, 6), ("mf214", 256, 1024, 3), ("mf151", 256, 1024, 3),
        ("mf96", 128, 512, 3), ("mf52", 128, 512, 3), ("mf26", 128, 512, 3)}


def _fake_detectron2(tmp_path):
    pkg = tmp_path / "fake" / "detectron2"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('__version__ = "9.9.9-fake"\n')
    return str(tmp_path / "fake")


def test_installer_leaves_an_importable_detectron2_alone(tmp_path):
    env = dict(os.environ, PYTHONPATH=_fake_detectron2(tmp_path),
               MFDET_DETECTRON2_SPEC="/nonexistent/would-fail-if-pip-ran")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "install_detectron2.py")],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert "detectron2 9.9.9-fake already importable: left as it is" in result.stdout
    assert "compiled ops (detectron2._C): not available" in result.stdout
    assert "pip" not in result.stdout


def test_installer_reports_a_wheel_that_cannot_be_fetched(monkeypatch, capsys):
    monkeypatch.setattr(install_detectron2, "detectron2_status", lambda python: None)
    monkeypatch.delenv("MFDET_DETECTRON2_SPEC", raising=False)

    def failing_pip(python, *args):
        raise install_detectron2.InstallError("'pip download' failed with exit code 1")

    monkeypatch.setattr(install_detectron2, "_pip", failing_pip)
    assert install_detectron2.main([]) == 1
    err = capsys.readouterr().err
    assert "could not fetch the wheel sal-detectron2==0.7.2" in err
    assert "MFDET_DETECTRON2_SPEC" in err


def test_retagged_wheel_drops_tools_and_compiled_op(tmp_path):
    src = tmp_path / "sal_detectron2-0.7.2-cp310-none-any.whl"
    with zipfile.ZipFile(src, "w") as z:
        z.writestr("detectron2/__init__.py", "")
        z.writestr("detectron2/_C.cpython-310-x86_64-linux-gnu.so", b"\0")
        z.writestr("tools/train_net.py", "")
        z.writestr("sal_detectron2-0.7.2.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: cp310-cp310-linux_x86_64\n")
        z.writestr("sal_detectron2-0.7.2.dist-info/top_level.txt", "detectron2\ntools\n")
        z.writestr("sal_detectron2-0.7.2.dist-info/RECORD", "")
    out = install_detectron2.retag_wheel(str(src), str(tmp_path))
    assert out.endswith("sal_detectron2-0.7.2-py3-none-any.whl")
    with zipfile.ZipFile(out) as z:
        names = z.namelist()
        assert "detectron2/__init__.py" in names
        assert not any(n.startswith("tools/") or n.endswith(".so") for n in names)
        assert "Tag: py3-none-any" in z.read("sal_detectron2-0.7.2.dist-info/WHEEL").decode()
        record = z.read("sal_detectron2-0.7.2.dist-info/RECORD").decode()
        assert "detectron2/__init__.py,sha256=" in record


@pytest.mark.skipif(not os.path.isdir(os.path.join(sys.prefix, "lib")), reason="no environment to inspect")
def test_no_stray_tools_package_is_installed():
    import importlib.util

    spec = importlib.util.find_spec("tools")
    assert spec is None or not (spec.origin or "").startswith(sys.prefix), spec
