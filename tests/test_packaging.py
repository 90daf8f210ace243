"""Packaging: the wheel installs only the `tritarget` namespace; README and CI agree."""

import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sdist")
    build = f"from setuptools import build_meta; build_meta.build_sdist({str(out)!r})"
    subprocess.run([sys.executable, "-c", build], cwd=ROOT, check=True, capture_output=True)
    (path,) = out.glob("tritarget-*.tar.gz")
    return path


@pytest.fixture(scope="module")
def wheel(sdist, tmp_path_factory) -> Path:
    """Built from the unpacked sdist, as ``python -m build`` builds it: the sdist must hold
    what the wheel needs, and nothing left in the tree's ``build/`` ships (a wheel built in
    the tree reused ``build/lib``: a module deleted from the source still shipped)."""
    unpacked, out = tmp_path_factory.mktemp("unpacked"), tmp_path_factory.mktemp("wheel")
    with tarfile.open(sdist) as archive:
        archive.extractall(unpacked, filter="data")
    (source,) = unpacked.iterdir()
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("tritarget-*.whl")
    return path


def test_sdist_holds_the_schema_the_license_and_the_whole_test_suite(sdist):
    """The source release: the .proto and the script that generate the protobuf modules,
    the license text, and the tests with their helpers (the test files alone, as before,
    failed to import ``support`` from an unpacked sdist)."""
    names = {name.split("/", 1)[1] for name in tarfile.open(sdist).getnames() if "/" in name}
    for path in ("LICENSE", "protos/tritarget/v1/target_assigner.proto", "protos/generate.sh", "tests/conftest.py",
                 "tests/support.py", "tests/test_service_harness.py", "tests/test_packaging.py"):  # fmt: skip
        assert path in names, path
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]


def test_wheel_installs_only_the_tritarget_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"tritarget", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    for module in ("kernels/anchors.py", "kernels/cpu_kernel.c", "service/cli.py", "clients/__init__.py"):
        assert f"tritarget/{module}" in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "tritarget = tritarget.service.cli:entry" in entry_points


def test_wheel_states_its_license_as_an_spdx_expression(wheel):
    """PEP 639: setuptools deprecates the table form (``{ text = ... }``) and stops
    building it after 2027-02-18."""
    names = zipfile.ZipFile(wheel).namelist()
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata.splitlines()
    assert "License-File: LICENSE" in metadata.splitlines()  # and its text beside it (Apache-2.0, section 4a)
    license_text = next(n for n in names if n.endswith(".dist-info/licenses/LICENSE"))
    assert b"Apache License" in zipfile.ZipFile(wheel).read(license_text)


def test_wheel_declares_what_it_imports_and_ships_its_schema(wheel):
    """``google.rpc`` is imported by the service and the client: only grpcio-status brought it,
    accepting a googleapis-common-protos that cannot load under protobuf 7 (every command
    failed at import). The .proto ships for clients in other languages."""
    archive = zipfile.ZipFile(wheel)
    metadata = archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    assert "Requires-Dist: googleapis-common-protos>=1.56.1" in metadata.splitlines()
    assert "tritarget/protos/tritarget/v1/target_assigner.proto" in archive.namelist()


def test_wheel_leaves_triton_to_torch_or_the_gpu_extra(wheel):
    """triton (~1 GB installed) runs only on a GPU, where CUDA builds of torch bring it: a
    CPU machine (a data-loader worker) installs none. The gpu extra names it for the rest,
    and dev for the tests, which run the kernels in its interpreter."""
    archive = zipfile.ZipFile(wheel)
    metadata = archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist: ")]
    triton = [line for line in requires if line.startswith("Requires-Dist: triton")]
    assert triton and all('extra == "gpu"' in line for line in triton), triton
    assert any(line.startswith("Requires-Dist: tritarget[gpu]") and 'extra == "dev"' in line for line in requires)


_WITHOUT_TRITON = "import sys; sys.modules['triton'] = None  # import triton: ModuleNotFoundError\n"


def test_without_triton_the_cpu_path_runs_and_the_triton_backend_names_what_is_missing(tmp_path):
    code = _WITHOUT_TRITON + (
        "import torch\n"
        "from tritarget.kernels import assign, presets\n"
        "boxes, config = torch.tensor([[4.0, 4.0, 40.0, 30.0]]), presets.get('retinanet_torchvision')\n"
        "print(int((assign(boxes, [1], (64, 96), config, backend='auto').labels == 1).sum()))\n"
        "try:\n"
        "    assign(boxes, [1], (64, 96), config, backend='triton')\n"
        "except ModuleNotFoundError as missing:\n"
        "    print(missing)\n"
    )
    env = {**os.environ, "TRITARGET_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    positives, message = result.stdout.splitlines()
    assert int(positives) > 0
    assert message.startswith("the triton backend needs the triton package, which is not installed here")
    assert "pip install 'tritarget[gpu]'" in message


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (
            ["serve", "--backend", "triton", "--port", "0"],
            "backend 'triton' (from 'triton') cannot run here: the triton",
        ),
        (
            ["anchors", "check", "--annotations", "never_read.json", "--preset", "yolov5", "--backend", "triton"],
            "--backend triton: the",
        ),
    ],
    ids=["serve", "anchors"],
)
def test_without_triton_the_commands_that_would_run_it_say_so(argv, said, tmp_path):
    code = _WITHOUT_TRITON + f"from tritarget.service.cli import entry; sys.argv = ['tritarget', *{argv!r}]; entry()\n"
    env = {**os.environ, "TRITARGET_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert said in result.stderr and "not installed here" in result.stderr and "Traceback" not in result.stderr


def test_wheel_imports_from_its_own_files(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
    )
    code = (
        "import sys, torch, tritarget.kernels as k\n"
        "print(k.__file__, 'triton' in sys.modules)\n"
        "boxes = torch.tensor([[4.0, 4.0, 40.0, 30.0]])\n"
        "t = k.assign(boxes, [1], (64, 96), k.presets.get('retinanet_torchvision'), backend='cpu')\n"
        "print(int((t.labels == 1).sum()))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site), "TRITARGET_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    path, triton_loaded, positives = result.stdout.split()
    assert Path(path).is_relative_to(site)
    assert triton_loaded == "False", "importing tritarget.kernels must not import triton"
    assert int(positives) > 0, "the cpu backend runs from the wheel's own files"


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [block.strip() for block in blocks[:2]]


def test_ci_runs_the_readme_test_command():
    _, test_command = _readme_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()
    assert "pytest" in test_command
