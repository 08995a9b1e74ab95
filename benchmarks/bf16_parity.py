"""Low-precision parity of the distillation loss: each compute-dtype variant vs the float32 path.

Same weights (the same seeds; a bfloat16 teacher holds them rounded), same images, same drop-path masks: the
relation loss and the student's gradient of each variant against float32 computed at
`jax.default_matmul_precision('highest')` (true float32 matmuls; a GPU's default float32 matmul is TF32).
Rows: relative loss difference, relative L2 distance of the whole gradient, its cosine similarity.

  python benchmarks/bf16_parity.py                                  # CPU: ViT-S from ViT-B, 224 px, batch 4
  python benchmarks/bf16_parity.py --device gpu --size b_from_l --batch 32 \\
      --variants float32,bfloat16,bfloat16/bfloat16,bfloat16/bfloat16+cudnn

Variants as in distill_step.py: `teacher_dtype[/student_dtype][+attention]`.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  common.add_size_args(p, batch=4)
  p.add_argument("--device", default="cpu", help="cpu | gpu | tpu")
  p.add_argument("--variants", default="float32,bfloat16,bfloat16/bfloat16")
  p.add_argument("--no-append", action="store_true", help="do not append to BENCHMARKS.md")
  args = p.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", {"gpu": "cuda"}.get(args.device, args.device))

  import jax
  import numpy as np

  from benchmarks.distill_step import build, parse_variant, step_pieces

  def loss_and_grad(variant: str, precision: str | None):
    b = build(args.size, args.batch, img=args.img, **parse_variant(variant))
    _, loss_fn = step_pieces(b)
    st = b["state"]
    with jax.default_matmul_precision(precision):
      loss, grads = jax.jit(jax.value_and_grad(loss_fn))(st["params"], st, b["batch"], b["rng"])
    flat = np.concatenate([np.asarray(g, np.float64).ravel() for g in jax.tree.leaves(grads)])
    return float(loss), flat

  ref_loss, ref_g = loss_and_grad("float32", "highest")
  rows = []
  for variant in args.variants.split(","):
    loss, g = loss_and_grad(variant, None)
    rel_g = np.linalg.norm(g - ref_g) / np.linalg.norm(ref_g)
    cos = float(g @ ref_g / (np.linalg.norm(g) * np.linalg.norm(ref_g)))
    rows.append([variant, f"{loss:.6g}", f"{abs(loss - ref_loss) / abs(ref_loss):.2e}", f"{rel_g:.2e}",
                 f"{cos:.6f}"])
    print(f"{variant}: loss {loss:.6g} (float32 highest {ref_loss:.6g}), grad rel L2 {rel_g:.2e}, cos {cos:.6f}",
          file=sys.stderr)
  pair = common.SIZES[args.size]
  dev = jax.devices()[0]
  body = (f"{pair.label}, {args.img} px, batch {args.batch}, {dev.platform}:{dev.device_kind}; randomly "
          f"initialised models (seeded as distill_step.py), Gaussian images. Reference: every variant's "
          f"loss and student gradient against float32 at matmul precision 'highest' (loss {ref_loss:.6g}). "
          f"Variants run at the default matmul precision (on GPUs float32 matmuls are TF32 by default).\n\n" +
          common.table(["variant", "loss", "rel. loss diff", "grad rel. L2 diff", "grad cosine"], rows))
  print(body)
  if not args.no_append:
    common.append_section(f"Low-precision parity: {pair.label}, batch {args.batch}, {args.device}", body,
                          devices=f"{dev.platform}:{dev.device_kind}", with_torch=False)


if __name__ == "__main__":
  main()
