"""PyTorch (timm / MAE / TinyMIM) checkpoints <-> tinymim-jax models.

The only module of the project that knows PyTorch parameter names. Name mapping (docs/method.md section 7):

  ours (nnx state path)                      PyTorch name                       layout change
  [encoder.]patch_embed.kernel (p,p,3,D)      patch_embed.proj.weight (D,3,p,p)  conv transpose
  [encoder.]cls_token / pos_embed             cls_token / pos_embed              -
  reg_token / norm_pre / blocks.i.ls1.gamma   the same names (DINOv2 / CLIP)     -
  blocks.i.ls1.gamma / ls2.gamma              also read from blocks.i.gamma_1 / gamma_2 (BEiT; the authors'
                                              segmentation backbone)
  blocks.i.attn.relative_position_bias_table  the same name; a file's relative_position_index is checked
                                              against the model's and skipped
  dist_token / head_dist                      the same names (DeiT distilled)    -
  conv1x1.norm | conv1x1.fc (TinyMIM*-T)      conv1x1.0 | conv1x1.1              as above
  [encoder.]blocks.i.<lin>.kernel (in,out)    blocks.i.<lin>.weight (out,in)     transpose
  <norm>.scale                                <norm>.weight                      -
  norm | fc_norm | head                       norm | fc_norm | head              -
  mask_token, decoder_* (MAE)                 mask_token, decoder_*              as above

MAE keeps the encoder keys at the top level of its state dict, so our `encoder.` prefix is dropped. Layer scale
is read from `gamma_1` / `gamma_2` as timm's checkpoint_filter_fn(adapt_layer_scale=True) does; exports use timm's
names.

Loading is all-or-nothing: every key of the file is either loaded or reported as skipped with a reason,
and any missing / unexpected / mis-shaped key raises one WeightMismatchError listing all of them before
anything is written to the model. `.pth` files are read with torch's weights-only unpickler (torch >= 2.6), a
.safetensors header is checked against the file's size before anything is read, and a file that is neither
raises UnreadableFileError naming it.

What a file holds beyond its tensors is chosen the way timm does: the EMA copy of a training checkpoint
(`state_dict_ema` of timm's train.py, `model_ema` of DeiT) unless ema=False, a wrapper's key prefix (`module.`,
`model.`, `backbone.`, ...) removed and reported. Tensors keep the file's dtype (float16 / bfloat16 via ml_dtypes /
float32 / float64) until they are written into a model, which casts them to its parameters' dtype.

A state dict does not store head counts: `save_pytorch_weights` writes the architecture beside the weights
(`<name>.config.json`, timm / Hugging Face hub style, every ViTConfig field) and readers use it when present.

Other libraries' layouts (transformers ViT / ViTMAE / Dinov2, DINOv2's hub files, OpenAI / OpenCLIP visual towers)
are read in timm names (layouts.py), and hub folders (a transformers snapshot or timm's: config.json + weights) as
a weight file with its architecture (hub.py), which also writes timm hub folders.

Rooms: errors.py (errors, and hints that spell an option the way the user sets it), files.py (reading and writing
.pth / .safetensors: EMA copy, wrapper prefix), dtypes.py, sidecar.py (the architecture beside a file), names.py
(the one table of names and layouts), resample.py (positional tables to another grid), load.py (loading, its
report). This module is their public surface.

Command line: python -m tinymim_jax.convert {import,export,inspect} --help (tinymim_jax/convert_cli.py).
"""

from tinymim_jax.convert.errors import AmbiguousCheckpointError, ConvertError, HintContext, MissingSourceError, UnreadableFileError, UnsafeCheckpointError, WeightMismatchError, render_fix
from tinymim_jax.convert.dtypes import FLOAT_DTYPES, as_dtype, cast_weights, dtype_summary
from tinymim_jax.convert.files import SAFE_GLOBALS, TORCH_FLOOR, Checkpoint, read_checkpoint, read_pytorch_weights, read_safetensors_metadata, save_pytorch_weights
from tinymim_jax.convert.sidecar import ASSUMED_KEY, SIDECAR_SUFFIX, architecture, assumed_fields, check_sidecar, heads_text, read_sidecar, sidecar_configs, sidecar_for, sidecar_model, sidecar_path
from tinymim_jax.convert.names import detect_layout, export_pytorch_weights, state_dict_order
from tinymim_jax.convert.resample import RESAMPLE_METHODS, resample_pos_embed, square_grid
from tinymim_jax.convert.layouts import Converted, to_timm
from tinymim_jax.convert.hub import HUB_WEIGHTS, HubFolder, hub_folder, timm_config_sidecar, timm_hub_config, transformers_config_sidecar, write_hub_folder
from tinymim_jax.convert.load import LoadReport, describe_model, load_pytorch_weights, resample_method
