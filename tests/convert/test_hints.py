"""A hint is given only when following it leads to a correct load: each is followed here."""

import numpy as np
import pytest
import torch

from convert_testlib import assert_close, images, nchw, random_weights, timm_vit, tiny
from tinymim_jax import convert


@pytest.mark.parametrize("context,fix", [("api", "pooling='avg'"), ("cli", "--pooling avg"),
                                         ({"skip": "init_skip", "pooling": "model.pooling"},
                                          "--config.model.pooling=avg")])
def test_a_global_pool_file_into_a_cls_model_hints_the_pooling_and_following_it_is_correct(context, fix):
  tm = timm_vit(pooling="avg", num_classes=10)
  ft = {k: v.numpy() for k, v in tm.state_dict().items()}
  with pytest.raises(convert.WeightMismatchError) as err:
    convert.load_pytorch_weights(tiny(num_classes=10), ft, hint_context=context)
  hints = [line for line in str(err.value).splitlines() if "hint:" in line]
  assert hints and all("fc_norm" not in h.split(":", 2)[-1] for h in hints)  # nothing says skip fc_norm
  assert any(h.endswith(fix) for h in hints)
  # Following it: the global-pool model, whose logits are timm's.
  model = tiny(pooling="avg", num_classes=10)
  convert.load_pytorch_weights(model, ft)
  x = images()
  with torch.no_grad():
    assert_close(model(x)["logits"], tm.eval()(nchw(x)).numpy())


def test_a_transformers_layout_file_gets_no_hint_that_skips_all_of_it():
  ours = random_weights(tiny())
  hf = {("vit.embeddings.cls_token" if k == "cls_token" else
         "vit.encoder.layer." + k[len("blocks."):] if k.startswith("blocks.") else "vit." + k): v
        for k, v in ours.items()}
  hf["classifier.weight"] = np.zeros((10, 64), np.float32)
  with pytest.raises(convert.WeightMismatchError) as err:
    convert.load_pytorch_weights(tiny(), hf, hint_context="cli")
  assert "hint:" not in str(err.value)


def test_the_offered_skip_hint_is_one_that_loads():
  weights = random_weights(tiny())
  weights["dist_token"] = np.zeros((1, 1, 64), np.float32)
  with pytest.raises(convert.WeightMismatchError, match=r"hint: to ignore the file's dist_token .*skip=\(r'\^dist_token\$',\)"):
    convert.load_pytorch_weights(tiny(), weights)
  report = convert.load_pytorch_weights(tiny(), weights, skip=(r"^dist_token$",))
  assert "dist_token" in report.skipped
