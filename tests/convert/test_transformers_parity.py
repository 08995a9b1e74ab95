"""Hugging Face transformers' own models against ours on the same weights (the library that defines the layout).

Each case builds a tiny transformers model from a config object (random weights, no download), writes it with
save_pretrained (model.safetensors + config.json, the hub snapshot layout), reads the folder as a user does
(config.json for the architecture, convert.load_pytorch_weights) and runs both forwards on the same float32 images:
the final tokens (every token: CLS, registers, patches), each block's output (transformers' hidden_states), and
the pooled / classifier / MAE-decoder outputs where the model has them. transformers' DINOv3ViTModel layout is not
read by the converter (DINOv3 is read in timm's Eva names and its original hub layout: tests/models/test_dinov3.py).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: models are built from config objects

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.helpers.torch_ref import randomize_  # noqa: E402
from tinymim_jax import builders, convert, create_model  # noqa: E402

IMG, PATCH = 32, 8
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=IMG,
            patch_size=PATCH)
DECODER = dict(decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
               decoder_intermediate_size=64)
HF = "Hugging Face transformers "

# id -> (model class, config class, config fields, model arguments, the layout the report names)
CASES = {
    "vit": ("ViTModel", "ViTConfig", {}, {"add_pooling_layer": False}, HF + "ViT ("),
    "vit_pooler": ("ViTModel", "ViTConfig", {}, {}, HF + "ViT ("),
    "vit_classifier": ("ViTForImageClassification", "ViTConfig", {"num_labels": 5}, {}, HF + "ViT, under 'vit.'"),
    "vit_mae": ("ViTMAEModel", "ViTMAEConfig", {"mask_ratio": 0.0}, {}, HF + "ViTMAE ("),
    "vit_mae_pretraining": ("ViTMAEForPreTraining", "ViTMAEConfig", {"mask_ratio": 0.0, **DECODER}, {},
                            HF + "ViTMAE, under 'vit.'"),
    "dinov2": ("Dinov2Model", "Dinov2Config", {}, {}, HF + "Dinov2 ("),
    "dinov2_with_registers": ("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", {"num_register_tokens": 4},
                              {}, HF + "Dinov2WithRegisters ("),
}


def reference_model(kind):
  """The transformers model of `kind` with every parameter at random (LayerNorms, biases, layer scales, tokens),
  ViTMAE's fixed sin-cos tables as its hub files hold them."""
  cls, cfg_cls, fields, kw, _ = CASES[kind]
  model = getattr(transformers, cls)(getattr(transformers, cfg_cls)(**TINY, **fields), **kw).eval()
  fixed = {}
  for name, mod in model.named_modules():
    # transformers 5 leaves ViTMAE's sin-cos tables at zero when built from a config (its patch-projection init
    # marks the embeddings initialised first); the hub's files hold the tables: its own initialize_weights makes them.
    if type(mod).__name__ == "ViTMAEEmbeddings":
      mod.patch_embeddings.projection._is_hf_initialized = False
      mod.initialize_weights()
      fixed[f"{name}.position_embeddings".lstrip(".")] = mod.position_embeddings
    elif type(mod).__name__ == "ViTMAEDecoder":
      mod.initialize_weights((IMG // PATCH) ** 2)
      fixed[f"{name}.decoder_pos_embed"] = mod.decoder_pos_embed
  fixed = {n: p.detach().clone() for n, p in fixed.items()}
  assert all(float(t.abs().max()) > 0.5 for t in fixed.values())
  randomize_(model, seed=0)
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      leaf = name.split(".")[-1]
      if name in fixed:
        p.copy_(fixed[name])
      elif p.ndim == 2 and leaf == "weight":  # Linears at unit gain: attention far from uniform, so q / k show
        p.normal_(0.0, p.shape[1] ** -0.5, generator=gen)
      elif leaf == "lambda1":  # layer scale: near 1, so that a dropped or swapped one shows
        p.normal_(1.0, 0.3, generator=gen)
      elif leaf in ("cls_token", "register_tokens", "mask_token", "position_embeddings"):
        p.normal_(0.0, 0.5, generator=gen)
  return model


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
  """kind -> (transformers model, its save_pretrained folder), built once per module."""
  built = {}

  def get(kind):
    if kind not in built:
      model = reference_model(kind)
      folder = tmp_path_factory.mktemp(kind)
      model.save_pretrained(str(folder))
      built[kind] = model, str(folder)
    return built[kind]
  return get


def ours_from(folder, **overrides):
  """Our model of a hub folder, as a user builds it: the architecture from its config.json, then the weights."""
  name, args, decoder = convert.sidecar_model(convert.read_checkpoint(folder).sidecar)
  model = create_model(name, decoder=decoder, **{**args, **overrides})
  return model, convert.load_pytorch_weights(model, folder)


def images(size, seed=0):
  x = np.random.RandomState(seed).randn(2, size, size, 3).astype(np.float32)
  return x, torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def max_err(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.abs(ours - ref).max()), float(np.abs(ref).max())


def assert_close(ours, ref, what, tol=1e-5):
  err, mag = max_err(ours, ref)
  assert err <= tol * max(1.0, mag), f"{what}: max abs {err:.2e} (values up to {mag:.2f})"
  return err


def compare(kind, model, hf, x, xt):
  """Every output both models have -> {name: max abs difference}; asserts each within 1e-5 of its scale."""
  mae = kind.startswith("vit_mae")
  enc = model.encoder if kind == "vit_mae_pretraining" else model
  backbone = hf.vit if kind in ("vit_classifier", "vit_mae_pretraining") else hf
  # ViTMAE shuffles the patches by argsort(noise): increasing noise keeps their order (mask_ratio 0 keeps all).
  noise = {"noise": torch.arange(float((IMG // PATCH) ** 2)).expand(len(x), -1)} if mae else {}
  with torch.no_grad():
    ref = backbone(xt, output_hidden_states=True, **noise)
  out = enc(x, capture=range(1, len(ref.hidden_states)))
  errs = {"tokens": assert_close(out["tokens"], ref.last_hidden_state, f"{kind} tokens")}
  for i in range(1, len(ref.hidden_states)):  # hidden_states[i]: the output of layer i (before the final norm)
    errs[f"block {i}"] = assert_close(out["blocks"][i]["hidden"], ref.hidden_states[i], f"{kind} block {i}")
  if kind.startswith("dinov2"):  # Dinov2's pooler_output: CLS after the final norm, our 'pooled'
    errs["pooled"] = assert_close(out["pooled"], ref.pooler_output, f"{kind} pooled")
  if kind == "vit_classifier":
    with torch.no_grad():
      errs["logits"] = assert_close(out["logits"], hf(xt).logits, f"{kind} logits")
  if kind == "vit_mae_pretraining":  # the decoder's pixel predictions of every patch (none masked)
    import jax
    with torch.no_grad():
      want = hf(xt, **noise).logits
    errs["decoder"] = assert_close(model(x, rng=jax.random.key(0), mask_ratio=0.0)["pred"], want, f"{kind} decoder")
  return errs


@pytest.mark.parametrize("kind", list(CASES))
def test_matches_transformers(kind, snapshots):
  hf, folder = snapshots(kind)
  model, report = ours_from(folder)
  assert report.layout.startswith(CASES[kind][4]), report.layout
  model_type = hf.config.model_type
  assert f"config.json (transformers {model_type})" in str(report)
  skipped = {"vit_pooler": {"pooler.dense.weight", "pooler.dense.bias"},
             "dinov2": {"embeddings.mask_token"}, "dinov2_with_registers": {"embeddings.mask_token"}}
  assert set(report.skipped) == skipped.get(kind, set()), report.skipped
  compare(kind, model, hf, *images(IMG))
  if kind == "vit_mae_pretraining":  # as teacher.source / init: the folder is a source, its config.json the heads
    assert builders.source_architecture(folder)[0]["model_args"]["num_heads"] == 4


@pytest.mark.parametrize("kind", ["vit", "dinov2", "dinov2_with_registers"])
def test_resampled_table_matches_transformers(kind, snapshots):
  """At another resolution transformers interpolates the table at every forward; ours resamples it once at load,
  by default the way the layout's library does (transformers' Dinov2: bicubic to the new size; its
  Dinov2WithRegisters: antialiased), which the report names."""
  hf, folder = snapshots(kind)
  model, report = ours_from(folder, img_size=48)
  why = {"vit": "the default: MAE's", "dinov2": "transformers Dinov2's own",
         "dinov2_with_registers": "transformers Dinov2WithRegisters' own"}[kind]
  assert "resampled pos_embed: grid 4x4 -> 6x6" in str(report) and why in str(report), str(report)
  x, xt = images(48, seed=1)
  with torch.no_grad():
    ref = hf(xt, **({"interpolate_pos_encoding": True} if kind == "vit" else {})).last_hidden_state
  assert_close(model(x)["tokens"], ref, f"{kind} at 48 px")
