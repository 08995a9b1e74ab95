"""Tensors a weight file should not hold are refused by name, before anything is copied or allocated."""

import numpy as np
import pytest
import torch

from tinymim_jax import convert
from tinymim_jax import convert_cli as cli


@pytest.mark.parametrize("tensor,message", [
    (lambda: torch.zeros(1).expand(10**6, 10**6), "broadcast / overlapping view: shape (1000000, 1000000) with "
                                                  "strides (0, 0) claims 4,000,000,000,000 bytes over a storage of 4"),
    (lambda: torch.eye(3).to_sparse(), "is a sparse tensor (torch.sparse_coo)"),
    (lambda: torch.zeros(3, dtype=torch.complex64), "is complex (torch.complex64)"),
    (lambda: torch.quantize_per_tensor(torch.zeros(3), 0.1, 0, torch.qint8), "is quantized (torch.qint8)"),
])
def test_hostile_tensors_are_refused_by_name_in_one_line(tmp_path, capsys, tensor, message):
  path = tmp_path / "hostile.pth"
  torch.save({"model": {"blocks.0.attn.qkv.weight": tensor(), "cls_token": torch.zeros(1, 1, 8)}}, path)
  with pytest.raises(convert.UnreadableFileError, match="tensor 'blocks.0.attn.qkv.weight'"):
    convert.read_checkpoint(path)
  assert cli.main(["inspect", str(path)]) == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: cannot read hostile.pth") and message in err and len(err.splitlines()) == 1


def test_a_broadcast_numpy_state_dict_is_refused():
  with pytest.raises(convert.UnreadableFileError, match="broadcast view"):
    convert.read_checkpoint({"pos_embed": np.broadcast_to(np.zeros(1, np.float32), (10**6, 10**6))})
  with pytest.raises(convert.UnreadableFileError, match="complex"):
    convert.read_checkpoint({"pos_embed": np.zeros(3, np.complex64)})


def _safetensors(path, name, dtype, shape, nbytes):
  import json
  header = json.dumps({name: {"dtype": dtype, "shape": shape, "data_offsets": [0, nbytes]}}).encode()
  path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * nbytes)


@pytest.mark.parametrize("dtype,shape,message", [
    ("F32", [10**6, 10**6], "shape [1000000, 1000000] of F32 claims 4,000,000,000,000 bytes, its data_offsets hold 16"),
    ("C64", [2], "is complex (C64)"),
])
def test_safetensors_headers_are_checked_against_the_file(tmp_path, dtype, shape, message):
  path = tmp_path / "h.safetensors"
  _safetensors(path, "pos_embed", dtype, shape, 16)
  with pytest.raises(convert.UnreadableFileError, match=r"h.safetensors: not a valid \.safetensors") as e:
    convert.read_checkpoint(path)
  assert message in str(e.value)
