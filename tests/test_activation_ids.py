"""The activation ids are written four times: the Python dispatch (FUSED_ACTIVATIONS), the
C++ enum and attribute names of custom_ops/cc/activations.h, the C API's enum of
custom_ops/cuda/group_norm_act_cuda.h (checked against the C++ one by static_asserts in
custom_ops/cuda/gna_common.cuh) and the GPU harness's reference. These tests parse the
headers, so that changing one side alone fails here, before any build.
"""

import re
import sys
from pathlib import Path

from tf_proxynorm.ops.activations import FUSED_ACTIVATIONS

ROOT = Path(__file__).resolve().parent.parent
CC_HEADER = ROOT / "custom_ops" / "cc" / "activations.h"
C_API_HEADER = ROOT / "custom_ops" / "cuda" / "group_norm_act_cuda.h"


def _block(text, pattern):
    match = re.search(pattern + r"\s*\{(.*?)\};", text, re.S)
    assert match, f"{pattern!r} not found"
    return re.sub(r"//[^\n]*|/\*.*?\*/", "", match.group(1), flags=re.S)


def _snake(camel):
    return re.sub(r"(?<!^)(?=[A-Z])", "_", camel).lower()


def _cc_enum(header=CC_HEADER):
    body = _block(header.read_text(), r"enum\s+Activation\s*:\s*int")
    return {_snake(name): int(value) for name, value in re.findall(r"\bk(\w+)\s*=\s*(\d+)", body)}


def _cc_names():
    text = CC_HEADER.read_text()
    match = re.search(r"kActivationNames\[kNumActivations\]\s*=\s*\{(.*?)\};", text, re.S)
    assert match, "kActivationNames not found"
    return re.findall(r'"([^"]*)"', match.group(1))


def _cc_count():
    match = re.search(r"constexpr\s+int\s+kNumActivations\s*=\s*(\d+)\s*;", CC_HEADER.read_text())
    assert match, "kNumActivations not found"
    return int(match.group(1))


def _c_api_enum(header=C_API_HEADER):
    body = _block(header.read_text(), r"enum\s+tfpn_activation")
    return {name.lower(): int(value)
            for name, value in re.findall(r"\bTFPN_ACT_(\w+)\s*=\s*(\d+)", body)}


def test_python_ids_are_0_to_n():
    assert sorted(FUSED_ACTIVATIONS.values()) == list(range(len(FUSED_ACTIVATIONS)))


def test_cc_enum_matches_python():
    assert _cc_enum() == FUSED_ACTIVATIONS


def test_cc_attribute_names_match_python():
    # kActivationNames is indexed by id and gives the op attribute's strings.
    assert {name: i for i, name in enumerate(_cc_names())} == FUSED_ACTIVATIONS
    assert _cc_count() == len(FUSED_ACTIVATIONS)


def test_c_api_enum_matches_python():
    assert _c_api_enum() == FUSED_ACTIVATIONS


def test_gpu_harness_ids_match_python():
    sys.path.insert(0, str(ROOT / "custom_ops" / "gpu_test"))
    try:
        import reference_np
    finally:
        sys.path.pop(0)
    assert reference_np.ACTIVATIONS == FUSED_ACTIVATIONS


def test_parsers_see_a_change(tmp_path):
    """A renumbered id in either header is seen (the tests above are not vacuous)."""
    cc = tmp_path / "activations.h"
    cc.write_text(CC_HEADER.read_text().replace("kGelu = 3", "kGelu = 5"))
    c_api = tmp_path / "group_norm_act_cuda.h"
    c_api.write_text(C_API_HEADER.read_text().replace("TFPN_ACT_SILU = 2", "TFPN_ACT_SILU = 7"))
    assert _cc_enum(cc)["gelu"] == 5
    assert _c_api_enum(c_api)["silu"] == 7
