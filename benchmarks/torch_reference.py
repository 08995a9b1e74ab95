"""The reference TinyMIM distillation step in PyTorch, run the way the authors' code runs it on a device.

An independent re-implementation of the reference behaviour (docs/method.md sections 1-3; OliverRensu/TinyMIM on
facebookresearch/mae and timm 0.3.2), with the same shapes and work as ours:

- teacher: the MAE ViT run under `torch.no_grad()` up to its target block, which returns
  softmax(q k^T * s) and softmax(v v^T * s) from inside that block (explicit attention, as timm 0.3.2);
- student: TinyMIM ViT (drop path 0.1 in blocks 1..11, relation block with the teacher's head count),
  run to its relation block;
- loss: `KLDivLoss(reduction='none')(student.log(), teacher).sum(-1).mean()` for qk and vv, summed;
- `loss.item()` finiteness check, MAE's NativeScaler (GradScaler; unscale, grad-norm, step, update), AdamW
  (betas 0.9/0.95, wd 0.05 on params of ndim > 1 that are not biases, timm's `add_weight_decay`), the per-step
  lr of MAE's `adjust_learning_rate`, `zero_grad()`.
- precision: the reference wraps the forward in `torch.cuda.amp.autocast()`: fp16 autocast on CUDA
  (softmax / log / KL run in fp32 there), a no-op on CPU, i.e. plain float32 on CPU. `--amp auto` does the
  same; `--amp on|off` forces it.

Used as a worker by benchmarks/distill_step.py (one process per implementation); runnable alone:

  python benchmarks/torch_reference.py --size s_from_b --batch 8 --steps 5
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks import common  # noqa: E402


# --------------------------------------------------------------------------------------------------------
# Model (timm 0.3.2 / MAE layout; parameter names as timm's).
# --------------------------------------------------------------------------------------------------------
def sincos_table(dim: int, grid: int) -> np.ndarray:
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
  ys, xs = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
  half = lambda pos: np.concatenate([np.sin(np.outer(pos.reshape(-1), omega)),
                                     np.cos(np.outer(pos.reshape(-1), omega))], axis=1)
  table = np.concatenate([np.zeros((1, dim)), np.concatenate([half(xs), half(ys)], axis=1)], axis=0)
  return table[None].astype(np.float32)


class DropPath(nn.Module):

  def __init__(self, p: float):
    super().__init__()
    self.p = p

  def forward(self, x):
    if self.p == 0.0 or not self.training:
      return x
    keep = 1 - self.p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x.div(keep) * mask


class Attention(nn.Module):

  def __init__(self, dim, heads):
    super().__init__()
    self.heads = heads
    self.scale = (dim // heads) ** -0.5
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x, relation: bool = False):
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
    if relation:
      return attn, ((v @ v.transpose(-2, -1)) * self.scale).softmax(dim=-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):

  def __init__(self, dim, heads, drop_path=0.0):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, heads)
    self.drop_path = DropPath(drop_path)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = nn.Sequential()
    self.mlp.fc1 = nn.Linear(dim, 4 * dim)
    self.mlp.act = nn.GELU()
    self.mlp.fc2 = nn.Linear(4 * dim, dim)

  def forward(self, x, relation: bool = False):
    if relation:
      return self.attn(self.norm1(x), relation=True)
    x = x + self.drop_path(self.attn(self.norm1(x)))
    return x + self.drop_path(self.mlp(self.norm2(x)))


class RefViT(nn.Module):
  """MAE / TinyMIM encoder; forward returns the two relations of block `relation_block` (1-based)."""

  def __init__(self, name: str, *, heads: int, relation_heads: int, relation_block: int, drop_path: float = 0.0,
               img: int = 224):
    super().__init__()
    d, depth, _, p = common.VIT[name]
    g = img // p
    self.relation_block = relation_block
    self.patch_embed = nn.Module()
    self.patch_embed.proj = nn.Conv2d(3, d, p, p)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
    self.pos_embed = nn.Parameter(torch.from_numpy(sincos_table(d, g)), requires_grad=False)
    self.blocks = nn.ModuleList([
        Block(d, relation_heads if i == relation_block else heads, 0.0 if i == relation_block else drop_path)
        for i in range(1, depth + 1)])
    self.norm = nn.LayerNorm(d, eps=1e-6)
    for m in self.modules():
      if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        nn.init.zeros_(m.bias)
    w = self.patch_embed.proj.weight.data
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.normal_(self.cls_token, std=0.02)

  def forward(self, imgs):
    x = self.patch_embed.proj(imgs).flatten(2).transpose(1, 2) + self.pos_embed[:, 1:]
    cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    x = torch.cat((cls, x), dim=1)
    for i, blk in enumerate(self.blocks, start=1):
      if i == self.relation_block:
        return blk(x, relation=True)
      x = blk(x)
    raise AssertionError("unreachable")


def kd_loss(pred, target):
  return nn.KLDivLoss(reduction="none")(pred.log(), target).sum(-1).mean()


def add_weight_decay(model, weight_decay):
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    if not p.requires_grad:
      continue
    (no_decay if p.ndim == 1 or name.endswith(".bias") else decay).append(p)
  return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


# --------------------------------------------------------------------------------------------------------
# The step.
# --------------------------------------------------------------------------------------------------------
class Reference:

  def __init__(self, size: str, batch: int, device: str = "cpu", amp: str = "auto", threads: int = 2,
               img: int = 224, seed: int = 0, **_):
    if device == "cpu" and threads:
      torch.set_num_threads(threads)
    torch.manual_seed(seed)
    pair = common.SIZES[size]
    self.device = torch.device(device)
    self.amp = (self.device.type == "cuda") if amp == "auto" else amp == "on"
    self.batch = batch
    t_heads = common.VIT[pair.teacher][2]
    self.teacher = RefViT(pair.teacher, heads=t_heads, relation_heads=t_heads,
                          relation_block=pair.teacher_block, img=img).to(self.device).eval()
    for p in self.teacher.parameters():
      p.requires_grad_(False)
    self.student = RefViT(pair.student, heads=pair.student_heads, relation_heads=pair.relation_heads,
                          relation_block=pair.student_block, drop_path=0.1, img=img).to(self.device).train()
    self.opt = torch.optim.AdamW(add_weight_decay(self.student, 0.05), lr=2.4e-3, betas=(0.9, 0.95))
    # MAE's NativeScalerWithGradNormCount; GradScaler is disabled (identity) without AMP.
    self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)
    gen = torch.Generator().manual_seed(seed)
    self.x_t = torch.randn(batch, 3, img, img, generator=gen).to(self.device)
    self.x_s = torch.randn(batch, 3, img, img, generator=gen).to(self.device)
    self.it = 0

  def _autocast(self):
    return torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp)

  def _sync(self):
    if self.device.type == "cuda":
      torch.cuda.synchronize()

  def teacher_forward(self):
    with self._autocast(), torch.no_grad():
      return self.teacher(self.x_t)

  def loss(self, teacher_out):
    with self._autocast():
      qk, vv = self.student(self.x_s)
      return kd_loss(qk, teacher_out[0]) + kd_loss(vv, teacher_out[1])

  def step(self):
    # lr: MAE's adjust_learning_rate (warmup then half-cycle cosine), per iteration.
    lr = 2.4e-3 * min(1.0, (self.it + 1) / 15) * 0.5 * (1 + math.cos(math.pi * self.it / 300))
    for g in self.opt.param_groups:
      g["lr"] = lr
    loss = self.loss(self.teacher_forward())
    loss_value = loss.item()
    if not math.isfinite(loss_value):
      raise FloatingPointError(f"loss is {loss_value}")
    self.scaler.scale(loss).backward()
    self.scaler.unscale_(self.opt)
    grads = [p.grad for p in self.student.parameters() if p.grad is not None]
    norm = torch.norm(torch.stack([torch.norm(g.detach(), 2.0) for g in grads]), 2.0)
    self.scaler.step(self.opt)
    self.scaler.update()
    self.opt.zero_grad()
    self._sync()
    self.it += 1
    return loss_value, float(norm)

  # Pieces, for the profile table.
  def piece(self, name: str):
    if name == "teacher_fwd":
      self.teacher_forward()
    elif name == "student_fwd":
      t = self.teacher_forward()
      with torch.no_grad():
        self.loss(t).item()
    elif name == "student_fwd_bwd":
      t = self.teacher_forward()
      self.loss(t).backward()
      self.student.zero_grad()
    elif name == "step":
      self.step()
    self._sync()


# --------------------------------------------------------------------------------------------------------
# Worker / CLI.
# --------------------------------------------------------------------------------------------------------
def matmul_gflops(n: int = 4096, dtype: str = "float32", reps: int = 5, device: str = "cpu") -> float:
  dt = getattr(torch, dtype)
  a = torch.randn(n, n, device=device).to(dt)
  b = torch.randn(n, n, device=device).to(dt)
  sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
  a @ b
  sync()
  cpu = []
  ts = common.timed(lambda: (a @ b, sync()), reps, cpu)
  return 2.0 * n**3 / common.median(ts) / 1e9, 2.0 * n**3 / common.median(cpu) / 1e9


def make_worker(args) -> dict:
  t0 = time.perf_counter()
  ref = Reference(**vars(args))
  setup_s = time.perf_counter() - t0
  if ref.device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()

  def info():
    return {"setup_s": setup_s, "amp": ref.amp, "device": str(ref.device),
            "torch_threads": torch.get_num_threads(), "peak_rss": common.peak_rss_bytes()}

  def steps(n: int):
    cpu = []
    out = common.timed(ref.step, n, cpu)
    res = {"times": out, "cpu": cpu, "peak_rss": common.peak_rss_bytes()}
    if ref.device.type == "cuda":
      res["peak_device_bytes"] = torch.cuda.max_memory_allocated()
    return res

  def pieces(names, n: int):
    res = {}
    for name in names:
      ref.piece(name)
      cpu = []
      res[name] = {"times": common.timed(lambda: ref.piece(name), n, cpu), "cpu": cpu}
    return res

  def matmul(n: int = 4096, dtype: str = "float32", reps: int = 5):
    wall, cpu = matmul_gflops(n, dtype, reps, str(ref.device))
    return {"gflops": wall, "gflops_per_cpu_s": cpu}

  def profile(n: int = 1):
    from torch.profiler import ProfilerActivity, profile as tprofile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ref.device.type == "cuda" else [])
    ref.step()
    with tprofile(activities=acts) as prof:
      for _ in range(n):
        ref.step()
    keys = ["self_device_time_total", "self_cuda_time_total"] if ref.device.type == "cuda" else ["self_cpu_time_total"]
    for key in keys:  # torch renamed the CUDA column; try the new name first
      try:
        return {"table": prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=40)}
      except (KeyError, AttributeError, ValueError):
        continue
    return {"table": prof.key_averages().table(row_limit=18, max_name_column_width=40)}

  return {"info": info, "steps": steps, "pieces": pieces, "matmul": matmul, "profile": profile}


def add_args(p):
  common.add_size_args(p, batch=8)
  p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
  p.add_argument("--amp", default="auto", choices=["auto", "on", "off"],
                 help="fp16 autocast + GradScaler; auto = on for CUDA (as the reference), off on CPU")
  p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on CPU (0 = torch's default)")
  p.add_argument("--seed", type=int, default=0)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_args(p)
  p.add_argument("--worker", action="store_true", help="serve commands on stdin (used by distill_step.py)")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--profile", action="store_true", help="print torch.profiler's table of one step")
  args = p.parse_args()
  worker_args = argparse.Namespace(**{k: v for k, v in vars(args).items()
                                      if k not in ("worker", "steps", "profile")})
  handlers = make_worker(worker_args)
  if args.worker:
    common.serve(handlers)
    return
  handlers["steps"](2)
  res = handlers["steps"](args.steps)
  med = common.median(res["times"])
  print(f"reference step: median {med:.3f} s over {args.steps} -> {args.batch / med:.2f} img/s; "
        f"peak RSS {common.gib(res['peak_rss'])} GiB")
  if args.profile:
    print(handlers["profile"]()["table"])


if __name__ == "__main__":
  main()
