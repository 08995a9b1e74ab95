"""What a distillation learns: the config's `distill` section (DistillSpec), the targets (TARGETS: what a target
reads of the two target blocks, its loss and its extra layers), and the student params a target leaves untrained.

Adding a target = one entry of TARGETS plus its loss in losses.py (README, "Extending").
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from tinymim_jax import losses, optim
from tinymim_jax.models import vit as vit_lib

# --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DistillSpec:
  """What to distill (config.distill). Blocks are 1-based; the teacher runs only to teacher_block, the student
  to student_block."""
  target: str = "relation"          # a key of TARGETS
  teacher_block: int = 12
  student_block: int = 12
  w_qk: float = 1.0
  w_vv: float = 1.0
  feature_loss: str = "smooth_l1"   # 'smooth_l1' | 'mse' | 'cosine' (feature and cls targets)
  normalize_target: bool = False    # parameter-free LayerNorm on teacher features (feature target)
  student_mask_ratio: float = 0.0   # > 0: the student sees only a random subset of patches (ablation)

  def __post_init__(self):
    if self.target not in TARGETS:
      raise ValueError(f"distill.target must be one of {sorted(TARGETS)}, got {self.target!r}")


class WidthProjection(nnx.Module):
  """Linear student width -> teacher width (xavier-uniform, zero bias; params in the student's param_dtype,
  computed in the wider of float32 and the input's dtype): the feature and class-token targets' extra layer
  when the widths differ."""

  def __init__(self, student_dim: int, teacher_dim: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.linear = nnx.Linear(student_dim, teacher_dim, kernel_init=vit_lib.xavier_uniform, param_dtype=param_dtype,
                             rngs=rngs)

  def __call__(self, x):
    return self.linear(x.astype(vit_lib.wide_dtype(x.dtype)))


def _width_projection(student: vit_lib.ViTConfig, teacher: vit_lib.ViTConfig, rngs: nnx.Rngs):
  if student.embed_dim == teacher.embed_dim:
    return {}
  return {"distill_proj": WidthProjection(student.embed_dim, teacher.embed_dim, param_dtype=student.param_dtype,
                                          rngs=rngs)}


def _project(extras, x):
  return extras["distill_proj"](x) if "distill_proj" in extras else x


@dataclasses.dataclass(frozen=True)
class Target:
  """One distillation target: what it reads of the two target blocks, its loss, the parts of the student's
  target block that take no part in it, and the extra layers it trains beside the student."""
  qkv_only: bool    # the target blocks stop after their qkv Linear and give q/k/v (else their output 'hidden')
  # (teacher block, student block, extras, spec) -> (loss, aux metrics); blocks as ViT's out['blocks'][i]
  loss: Callable[[dict, dict, dict, DistillSpec], tuple[jax.Array, dict]]
  frozen_in_block: str = ""   # regex under the student's blocks/<i>/: untrained parts of its target block
  # True: what it reads is computed from the target block's input (q/k/v after norm1), so the student's own
  # representation there is that input, the previous block's output (the default feature block of its evals)
  reads_block_input: bool = False
  # (student ViTConfig, teacher ViTConfig, rngs) -> {name: module} trained with the student (never exported)
  extra_layers: Callable[[Any, Any, nnx.Rngs], dict[str, nnx.Module]] = lambda student, teacher, rngs: {}


# Adding a target = one entry here plus its loss in losses.py (README, "Extending").
TARGETS: dict[str, Target] = {
    # docs/method.md section 2: KL between the teacher's and the student's softmax(QK^T) and softmax(VV^T).
    "relation": Target(
        qkv_only=True,
        loss=lambda t, s, extras, spec: losses.relation_loss(t, s, w_qk=spec.w_qk, w_vv=spec.w_vv),
        frozen_in_block="attn/proj|norm2|mlp", reads_block_input=True),
    # The paper's feature and class-token baselines (TinyMIM section 3): hidden states, or their CLS token.
    "feature": Target(
        qkv_only=False,
        loss=lambda t, s, extras, spec: (losses.feature_loss(
            _project(extras, s["hidden"]), t["hidden"], kind=spec.feature_loss,
            normalize_target=spec.normalize_target), {}),
        extra_layers=_width_projection),
    "cls": Target(
        qkv_only=False,
        loss=lambda t, s, extras, spec: (losses.class_token_loss(
            _project(extras, s["hidden"][:, 0]), t["hidden"][:, 0], kind=spec.feature_loss), {}),
        extra_layers=_width_projection),
}


def distill_frozen_patterns(spec: DistillSpec, params: dict) -> tuple[str, ...]:
  """Student params that take no part in the loss: never updated, never decayed (docs/method.md section 2).

  Everything after the student's target block (later blocks, the final norm / head) and the parts of the target
  block its target does not read (relation: attn.proj, norm2, mlp) receive no gradient. Returns only the
  patterns that name a param of `params`.
  """
  depth = len(params["blocks"])
  if not 1 <= spec.student_block <= depth:
    raise ValueError(f"distill.student_block={spec.student_block} but the student has blocks 1..{depth}")
  later = [str(i) for i in range(spec.student_block, depth)]
  pats = [r"norm/.*", r"fc_norm/.*", r"head/.*"]
  if later:
    pats.append(rf"blocks/({'|'.join(later)})/.*")
  in_block = TARGETS[spec.target].frozen_in_block
  if in_block:
    pats.append(rf"blocks/{spec.student_block - 1}/({in_block})/.*")
  names = jax.tree.leaves(optim.param_names(params))
  return tuple(p for p in pats if any(optim.match([p], n) for n in names))


def feature_block(distill_section) -> int:
  """The block whose output a distilled student's features are (the frozen-feature evals' default): the
  student's target block, or the block before it when the target reads its block's input (Target.
  reads_block_input). `distill_section`: the config's `distill` section (a ConfigDict or its JSON)."""
  target = TARGETS[distill_section.get("target", "relation")]
  return int(distill_section["student_block"]) - (1 if target.reads_block_input else 0)
