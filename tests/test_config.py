"""The config tree: every key of MODEL.MF_DETR in its sub-node, the flat keys of 0.1.0 refused with
their new names (from a YAML file, its _BASE_ and the command line), unknown keys refused."""
import os
import subprocess
import sys

import pytest
import yaml

from helpers import ROOT, toy_cfg
from mobileformer_det.config import RENAMED_KEYS, setup_cfg


def test_unknown_config_key_is_rejected():
    with pytest.raises(AssertionError, match="Non-existent key: MODEL.MF_DETR.NUM_QUERYS"):
        toy_cfg("MODEL.MF_DETR.NUM_QUERYS", 10)


def test_every_renamed_key_exists_under_its_new_name():
    cfg = setup_cfg()
    for old, new in RENAMED_KEYS.items():
        node = cfg
        for part in new.split(".")[:-1]:
            node = node[part]
        assert new.split(".")[-1] in node, new
        assert old.split(".")[-1] not in cfg.MODEL.MF_DETR, old


def test_mf_detr_keys_are_grouped():
    """The top level holds the detector's shape only; the rest is in the sub-nodes."""
    c = setup_cfg().MODEL.MF_DETR
    assert set(c) == {"NUM_CLASSES", "NUM_QUERIES", "HIDDEN_DIM", "NUM_FEATURE_LEVELS", "USE_TOKENS", "ENC_LAYERS", "AIFI_LAYERS",
                      "DECODER", "PROPOSALS", "DENOISING", "ONE2MANY", "MATCHER", "LOSS", "TEST"}


@pytest.mark.parametrize("old", ["MODEL.MF_DETR.DEC_LAYERS", "MODEL.MF_DETR.TEST_NMS_THRESH", "MODEL.MF_DETR.DN_NUMBER"])
def test_an_old_flat_key_stops_with_its_new_name(old, tmp_path):
    new = RENAMED_KEYS[old]
    with pytest.raises(KeyError, match=f"{old} was renamed to {new}"):
        toy_cfg(old, 1)
    # in a user's YAML that builds on the toy recipe
    config = tmp_path / "mine.yaml"
    config.write_text(yaml.safe_dump({"_BASE_": os.path.join(ROOT, "configs", "mf_detr_toy.yaml"),
                                      "MODEL": {"MF_DETR": {old.split(".")[-1]: 1}}}))
    with pytest.raises(KeyError, match=f"{old} was renamed to {new}"):
        setup_cfg(str(config))
    # and in the base a YAML builds on
    derived = tmp_path / "derived.yaml"
    derived.write_text(yaml.safe_dump({"_BASE_": str(config), "SOLVER": {"MAX_ITER": 10}}))
    with pytest.raises(KeyError, match=f"{old} was renamed to {new}"):
        setup_cfg(str(derived))


@pytest.mark.slow
def test_train_net_stops_on_an_old_key_before_writing_anything(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config-file",
                             os.path.join(ROOT, "configs", "mf_detr_toy.yaml"), "OUTPUT_DIR", str(out),
                             "MODEL.MF_DETR.DEC_LAYERS", "2"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode != 0
    assert "MODEL.MF_DETR.DEC_LAYERS was renamed to MODEL.MF_DETR.DECODER.NUM_LAYERS" in result.stderr
    assert not out.exists()
