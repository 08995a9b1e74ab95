"""The sidecar (`<name>.config.json`): it describes only the file it was written for, a value its writer assumed
is marked as assumed and never overrides the user, and it is checked like a config before a model is built."""

import json

import ml_collections
import pytest

from convert_testlib import random_weights
from tinymim_jax import builders, convert, create_model
from tinymim_jax import convert_cli as cli

SHAPE = dict(img_size=32)  # vit_tiny_patch16 (D 192, 12 blocks, 3 heads) on a 2x2 grid


@pytest.fixture(scope="module")
def six_head_pth(tmp_path_factory):
  """A .pth of a 6-head model of vit_tiny's width (whose variant has 3): nothing in it says 6."""
  model = create_model("vit_tiny_patch16", num_heads=6, **SHAPE)
  convert.load_pytorch_weights(model, random_weights(model, seed=3))
  path = tmp_path_factory.mktemp("sidecar") / "x.pth"
  convert.save_pytorch_weights(model, path, sidecar=False)
  return path


def _teacher_config(source, num_heads=None):
  return ml_collections.ConfigDict({"teacher": {"source": str(source), "num_heads": num_heads}, "init": "",
                                    "model": {"num_heads": None}})


def test_an_assumed_head_count_is_marked_and_never_overrides_the_user(six_head_pth, tmp_path, capsys):
  src = tmp_path / "x.pth"
  src.write_bytes(six_head_pth.read_bytes())
  out = tmp_path / "x.safetensors"  # the same stem: x.config.json lies beside the .pth as well
  assert cli.main(["import", str(src), "--model", "vit_tiny_patch16", "--img-size", "64", "--out", str(out)]) == 0
  assert "marks the variant's as assumed" in capsys.readouterr().out
  side = json.loads((tmp_path / "x.config.json").read_text())
  assert side["weights_file"] == "x.safetensors" and "num_heads" in side["assumed"]
  # The .pth is not described by the sidecar written for the .safetensors.
  assert convert.read_sidecar(src) is None
  assert cli.main(["inspect", str(src)]) == 0
  assert "records" not in capsys.readouterr().out
  assert cli.main(["inspect", str(out)]) == 0
  assert "a count its writer assumed" in capsys.readouterr().out
  # The user's true count is taken, not refused; an unset count is not filled in from the guess.
  for source in (src, out):
    config = _teacher_config(source, num_heads=6)
    assert builders.resolve_source_heads(config, ("teacher",)) == [] and config.teacher.num_heads == 6
    config = _teacher_config(source)
    builders.resolve_source_heads(config, ("teacher",))
    assert config.teacher.num_heads is None
  # A later import of the same stem builds at the variant's size, not at the 64 px of the earlier --img-size.
  assert cli.main(["import", str(src), "--model", "vit_tiny_patch16", "--out", str(tmp_path / "w.safetensors")]) == 0
  assert json.loads((tmp_path / "w.config.json").read_text())["img_size"] == 224


def test_import_takes_the_head_counts_and_records_them(six_head_pth, tmp_path, capsys):
  out = tmp_path / "six.safetensors"
  assert cli.main(["import", str(six_head_pth), "--model", "vit_tiny_patch16", "--img-size", "32", "--num-heads", "6",
                   "--head-overrides", "2:12", "--out", str(out)]) == 0
  capsys.readouterr()
  side = convert.read_sidecar(out)
  assert side["model_args"]["num_heads"] == 6 and side["heads_per_block"] == [6] + [12] + [6] * 10
  assert not convert.assumed_fields(side)
  config = _teacher_config(out)
  builders.resolve_source_heads(config, ("teacher",))
  assert config.teacher.num_heads == 6
  with pytest.raises(convert.ConvertError, match="records 6 heads"):
    builders.resolve_source_heads(_teacher_config(out, num_heads=3), ("teacher",))
  assert cli.main(["import", str(six_head_pth), "--model", "vit_tiny_patch16", "--head-overrides", "two:12",
                   "--out", str(tmp_path / "bad.safetensors")]) == 1
  assert "expected BLOCK:HEADS" in capsys.readouterr().err


@pytest.mark.parametrize("key,value,message", [
    ("depth", 10**9, "model_args.depth=1000000000 is outside [1, 1024]"),
    ("img_size", 10**9, "model_args.img_size=1000000000 is outside [1, 8192]"),
    ("num_heads", 0, "model_args.num_heads=0 is outside [1, 4096]"),
    ("num_heads", "6", "model_args.num_heads='6' is not an integer"),
    ("num_heads", 5, "model_args.num_heads=5 does not divide embed_dim=192"),
    ("head_overrides", {"99": 6}, "names no block of 1..12"),
])
def test_a_sidecar_with_absurd_values_is_one_error_line(six_head_pth, tmp_path, capsys, key, value, message):
  out = tmp_path / "s.safetensors"
  assert cli.main(["import", str(six_head_pth), "--model", "vit_tiny_patch16", "--img-size", "32", "--num-heads", "6",
                   "--out", str(out)]) == 0
  side = json.loads((tmp_path / "s.config.json").read_text())
  side["model_args"][key] = value
  (tmp_path / "s.config.json").write_text(json.dumps(side))
  capsys.readouterr()
  assert cli.main(["inspect", str(out)]) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: cannot use ") and message in err and len(err.strip().splitlines()) == 1
  with pytest.raises(convert.UnreadableFileError, match="s.config.json"):
    builders.source_architecture(str(out))
