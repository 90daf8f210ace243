"""The committed generated code is what the regeneration script makes, and tensors
survive the wire format (with the size check refusing truncated data)."""

from __future__ import annotations

import gc
import os
import pathlib
import re
import shutil
import subprocess
import sys

import google.protobuf
import grpc
import pytest
import torch

from tritarget.protos import target_assigner_pb2 as pb
from tritarget.protos.tensors import TensorError, decode_tensor, encode_tensor

PROTOS = pathlib.Path(__file__).resolve().parent.parent / "protos"
GENERATED = ("target_assigner_pb2.py", "target_assigner_pb2.pyi", "target_assigner_pb2_grpc.py")


def _generated_by() -> str:
    text = (PROTOS / "target_assigner_pb2_grpc.py").read_text()
    return re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", text).group(1)


def test_regenerating_gives_the_committed_files(tmp_path):
    pytest.importorskip("grpc_tools", reason="needs grpcio-tools (the dev extra)")
    from importlib.metadata import version

    if version("grpcio-tools") != _generated_by():
        pytest.skip(f"grpcio-tools {version('grpcio-tools')} here; the committed code is from {_generated_by()}")
    if shutil.which("sh") is None:
        pytest.skip("needs a POSIX shell")
    env = {**os.environ, "PATH": f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run(["sh", str(PROTOS / "generate.sh"), str(tmp_path)], check=True, env=env, timeout=120)
    for name in GENERATED:
        assert (tmp_path / name).read_text() == (PROTOS / name).read_text(), f"{name} is stale: run protos/generate.sh"


def test_generated_code_imports_from_the_package():
    from tritarget.protos import target_assigner_pb2_grpc

    assert pb.DESCRIPTOR.package == "tritarget.v1"
    assert pb.DESCRIPTOR.name == "tritarget/v1/target_assigner.proto"
    assert hasattr(target_assigner_pb2_grpc, "TargetAssignerStub")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int8, torch.int32, torch.int64])
@pytest.mark.parametrize("shape", [(0,), (1,), (7, 4), (3, 0, 4), (2, 13, 4), ()])
def test_tensor_round_trip(dtype, shape):
    generator = torch.Generator().manual_seed(0)
    tensor = (torch.randn(shape, generator=generator) * 100).to(dtype)
    message = pb.Tensor.FromString(encode_tensor(tensor).SerializeToString())
    assert list(message.shape) == list(shape)
    assert len(message.data) == tensor.numel() * tensor.element_size()
    back = decode_tensor(message, "t")
    assert back.dtype == dtype and back.shape == tensor.shape and torch.equal(back, tensor)


@pytest.mark.parametrize("shape", [(50_000,), (12_500, 4)])
def test_decoded_tensors_view_the_bytes_and_outlive_the_message(shape):
    tensor = torch.arange(50_000, dtype=torch.int32).reshape(shape)
    message = pb.Tensor.FromString(encode_tensor(tensor).SerializeToString())
    data = message.data
    back = decode_tensor(message, "t")
    assert back.untyped_storage().nbytes() == len(data)  # a view, not a copy
    del message, data
    gc.collect()
    _ = [bytes(200_000) for _ in range(20)]  # memory freed by the message would be reused here
    assert torch.equal(back, tensor)


@pytest.mark.parametrize("shape", [(1,), (1, 1)])  # torch's view of a vector, numpy's of the rest
def test_writing_into_a_one_byte_tensor_leaves_other_bytes_alone(shape):
    """CPython shares one object among all equal 1-byte ``bytes``: a decoded [1, 1] labels
    tensor written into must not change what b"\x07" reads everywhere else."""
    message = pb.Tensor.FromString(encode_tensor(torch.full(shape, 7, dtype=torch.int8)).SerializeToString())
    back = decode_tensor(message, "labels")
    try:
        back.view(-1)[0] = 8
        assert b"\x07"[0] == 7 and message.data[0] == 7  # the byte itself (== compares the shared object)
    finally:
        back.view(-1)[0] = 7  # on a view of the shared object, undo the damage for the tests after this one


def test_little_endian_row_major():
    message = encode_tensor(torch.tensor([[1, 2], [3, 256]], dtype=torch.int32))
    assert message.data == bytes([1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 0, 1, 0, 0])
    assert encode_tensor(torch.arange(6, dtype=torch.int8).reshape(2, 3).t()).data == bytes([0, 3, 1, 4, 2, 5])


def test_size_check_and_expectations():
    message = encode_tensor(torch.zeros(2, 4))
    message.data = message.data[:-1]
    with pytest.raises(TensorError, match=r"boxes: shape \[2, 4\] x 4 bytes needs 32 bytes, got 31"):
        decode_tensor(message, "boxes")
    with pytest.raises(TensorError, match="dtype DTYPE_FLOAT32 not allowed here"):
        decode_tensor(encode_tensor(torch.zeros(2, 4)), "x", dtypes=(torch.int32,))
    with pytest.raises(TensorError, match="expected last dimension 4"):
        decode_tensor(encode_tensor(torch.zeros(2, 3)), "x", last_dim=4)
    with pytest.raises(TensorError, match="unknown or unset dtype"):
        decode_tensor(pb.Tensor(), "x")
    with pytest.raises(TensorError, match=r"x: negative dimension in shape \[-1, 0\]"):  # no bytes, yet no tensor
        decode_tensor(pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[-1, 0]), "x")
    with pytest.raises(TensorError, match=r"x: dimension over 2147483647 in shape \[4611686018427387904, "):
        decode_tensor(pb.Tensor(dtype=pb.DTYPE_INT32, shape=[2**62, 2**62, 0]), "x")  # torch's RuntimeError before
    with pytest.raises(TypeError, match="no wire encoding"):
        encode_tensor(torch.zeros(2, dtype=torch.float64))


def test_generated_code_imports_from_a_wheel(tmp_path):
    """The flat layout (tritarget/protos/*_pb2*.py) ships in the wheel and imports there."""
    root = PROTOS.parent
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)]
    subprocess.run([*build, str(root)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("tritarget-*.whl")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    code = (
        "import tritarget.protos.target_assigner_pb2_grpc as g, tritarget.clients, tritarget.service.server\n"
        "print(g.__file__)\n"
    )
    # The wheel first, then the grpc and protobuf this process imported: a site that shadows
    # older ones in the interpreter's own (PYTHONPATH, pip --target) must shadow them there too.
    deps = [pathlib.Path(grpc.__file__).parents[1], pathlib.Path(google.protobuf.__file__).parents[2]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, dict.fromkeys([site, *deps])))}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert pathlib.Path(result.stdout.strip()).is_relative_to(site)
