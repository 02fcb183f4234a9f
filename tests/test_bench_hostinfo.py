"""benches/hostinfo.py's CPU line: a VM's generic model name gets the family/model ids that tell the
CPU generation (the benchmarks print it beside every ratio)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benches"))
import hostinfo  # noqa: E402

ZEN5 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
stepping\t: 1
flags\t\t: fpu sse2 avx2 fma f16c avx512f avx512bw avx512_bf16 avx512vbmi
"""

ARM = """processor\t: 0
BogoMIPS\t: 2000.00
Features\t: fp asimd asimdhp bf16
CPU implementer\t: 0x41
CPU part\t: 0xd4f
"""


def test_x86_model_carries_family_and_model():
    c = hostinfo.cpu(ZEN5)
    assert c["model"] == "AMD EPYC (cpu family 26, model 2, stepping 1)"
    assert c["flags"] == [f for f in hostinfo.FLAGS if f in ZEN5.split()]
    assert "avx512_bf16" in c["flags"] and "avx512_vnni" not in c["flags"]


def test_arm_model_carries_implementer_and_part():
    assert hostinfo.cpu(ARM)["model"] == "unknown (CPU implementer 0x41, CPU part 0xd4f)"


def test_no_cpuinfo():
    assert hostinfo.cpu("")["model"] == "unknown"
