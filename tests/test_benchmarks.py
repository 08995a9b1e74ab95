"""The benchmarks compare like with like: the PyTorch reference step computes our loss, the analytic FLOP
count matches XLA's, and the GPU profile summary reads only the kernel lines of a trace."""

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from benchmarks import common, distill_step, torch_reference
from tinymim_jax import convert, losses, train_steps as ts


@pytest.fixture(scope="module")
def reference():
  """The reference step's models at a tiny image size (2x2 patches), float32, drop path off."""
  ref = torch_reference.Reference("s_from_b", batch=2, img=32, device="cpu", amp="off", threads=1)
  ref.student.eval()
  return ref


def test_reference_loss_equals_ours(reference):
  b = distill_step.build("s_from_b", 2, img=32)  # our models, built as the trainer builds them
  student = ts.merge_model(b["graphdef"], b["state"]["params"], b["state"]["consts"])
  teacher = nnx.merge(b["tgraph"], b["state"]["teachers"]["teacher"])
  convert.load_pytorch_weights(student, reference.student.state_dict())
  convert.load_pytorch_weights(teacher, reference.teacher.state_dict())
  with torch.no_grad():
    want = float(reference.loss(reference.teacher_forward()))
  nhwc = lambda x: jax.numpy.asarray(x.permute(0, 2, 3, 1).numpy())
  spec = b["spec"]
  t = teacher(nhwc(reference.x_t), depth=spec.teacher_block, qkv_only=True)["blocks"][spec.teacher_block]
  s = student(nhwc(reference.x_s), depth=spec.student_block, qkv_only=True)["blocks"][spec.student_block]
  got = float(losses.relation_loss(t, s)[0])
  assert want > 1e-3  # not a trivially zero loss
  np.testing.assert_allclose(got, want, rtol=2e-5)


def test_analytic_flops_match_xla():
  b, compiled, *_ = distill_step.build_and_compile("t_from_b", 2, img=64)
  analytic = common.distill_flops(common.SIZES["t_from_b"], 2, 64)["total"]
  xla = distill_step.cost_flops(compiled)
  # XLA also counts elementwise work (a few %), never less than the matmuls.
  assert analytic <= xla <= 1.1 * analytic, (analytic, xla)


def test_parse_variant():
  assert distill_step.parse_variant("bfloat16") == dict(teacher_dtype="bfloat16", student_dtype="float32",
                                                        attention="default")
  assert distill_step.parse_variant("bfloat16/bfloat16+cudnn") == dict(
      teacher_dtype="bfloat16", student_dtype="bfloat16", attention="cudnn")


def test_gpu_kernel_summary_reads_stream_lines_only():
  events = [
      {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
      {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #7(Compute)"}},
      {"ph": "M", "name": "thread_name", "pid": 1, "tid": 8, "args": {"name": "XLA Ops"}},
      {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
      {"ph": "X", "pid": 1, "tid": 7, "name": "nvjet_sm90_tst_128x128", "dur": 3000},
      {"ph": "X", "pid": 1, "tid": 7, "name": "cudnn_generated_sdpa_flash_fprop", "dur": 1000},
      {"ph": "X", "pid": 1, "tid": 7, "name": "loop_add_fusion", "dur": 2000},
      {"ph": "X", "pid": 1, "tid": 8, "name": "dot.3", "dur": 3000},        # the same time, another line
      {"ph": "X", "pid": 2, "tid": 1, "name": "host work", "dur": 99999},
  ]
  rows = {(r[0], r[1]): r[2:] for r in distill_step.gpu_kernel_summary(events, n_steps=2, wall_s=0.004)["rows"]}
  assert rows[("GPU busy (all kernels)", "")] == ["3.00 ms", "75% of the step's wall time"]
  assert rows[("kind", "matmul / conv")] == ["1.50 ms", "50%"]
  assert rows[("kind", "fused attention")] == ["0.50 ms", "17%"]
  assert rows[("kind", "elementwise / reduce fusions")] == ["1.00 ms", "33%"]
