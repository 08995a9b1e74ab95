"""Against the authors' own numbers: the float64 case computed by their PyTorch TinyMIM code.

tests/testdata/reference/tinymim_ref_A.npz (README beside it): a TinyMIM student (D 24, 12 blocks, 2 heads,
4 in its relation block 12) and a teacher (D 32, 3 blocks, 4 heads, relation block 2), their weights, two
inputs, the four relation maps, both losses and every student gradient, all in float64. Our models, built
from a trainer config with dtype = param_dtype = float64, load the weights through the converter (PyTorch
names) and must reproduce the maps and losses to 1e-12 absolute and the gradients of the trainer's jitted
distillation step to 1e-10 relative. A float32 parameter, constant or softmax anywhere on the path misses by
1e-9 to 1e-7.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers import exact
from tinymim_jax import builders, config_base, convert, losses, optim, train_steps as ts
from tinymim_jax.objectives import distill

REF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata", "reference", "tinymim_ref_A.npz")
MAPS = ("t_qk", "t_vv", "s_qk", "s_vv")


@pytest.fixture(scope="module")
def ref():
  with np.load(REF) as z:
    out = {k: z[k] for k in z.files}
  out["meta"] = json.loads(str(out["meta"]))
  return out


def reference_config(meta):
  """The trainer's config for the reference case: float64 student and teacher, relation target."""
  c = config_base.base_config()
  for section, m in ((c.model, meta["student"]), (c.teacher, meta["teacher"])):
    section.update(name="vit_tiny_patch16", img_size=m["img_size"], patch_size=m["patch_size"],
                   embed_dim=m["embed_dim"], depth=m["depth"], num_heads=m["num_heads"], mlp_ratio=m["mlp_ratio"],
                   dtype="float64", param_dtype="float64")
  c.model.drop_path = meta["student"]["drop_path"]
  c.distill.update(teacher_block=meta["teacher_relation_block_1based"],
                   student_block=meta["student_relation_block_1based"],
                   relation_heads=meta["student"]["last_heads"])
  return c


def torch_named(graphdef, params, consts):
  """A params-shaped tree (params, gradients) as {PyTorch name: array in PyTorch layout}, via the exporter."""
  return convert.export_pytorch_weights(ts.merge_model(graphdef, params, consts))


@pytest.fixture(scope="module")
def ours(ref):
  """Everything the tests compare, computed once under x64 (scoped to this fixture), as numpy."""
  z, meta = ref, ref["meta"]
  with jax.enable_x64(True):
    c = reference_config(meta)
    student, teacher = builders.make_model(c), distill.make_teacher(c)
    built_table = np.asarray(student.pos_embed[...])
    # The teacher as the trainer builds and loads it: blocks 1..teacher_block (its file's later block unused).
    reports = [convert.load_pytorch_weights(m, {k[len(p):]: v for k, v in z.items() if k.startswith(p)}, depth=d)
               for m, p, d in ((student, "stu/", None), (teacher, "tea/", c.distill.teacher_block))]
    dtypes = {str(x.dtype) for m in (student, teacher) for x in jax.tree.leaves(nnx.state(m))}
    x_t, x_s = (np.ascontiguousarray(z[k].transpose(0, 2, 3, 1)) for k in ("xT", "xS"))  # NCHW -> NHWC

    # Forward: the relation blocks' q / k / v, maps and losses.
    tb, sb = c.distill.teacher_block, c.distill.student_block
    t = teacher(jnp.asarray(x_t), depth=tb, capture=(tb,), qkv_only=True)["blocks"][tb]
    s = student(jnp.asarray(x_s), depth=sb, capture=(sb,), qkv_only=True)["blocks"][sb]
    maps = {name: jax.nn.softmax(losses.relation_logits(m[a], m[b]), axis=-1)
            for name, m, a, b in (("t_qk", t, "q", "k"), ("t_vv", t, "v", "v"), ("s_qk", s, "q", "k"),
                                  ("s_vv", s, "v", "v"))}
    _, parts = losses.relation_loss(t, s)

    # Gradients: the trainer's distillation step (jit_step, batch over 2 devices) with an optimizer that
    # stores them.
    spec = distill.distill_spec(c)
    # The trainer's optimizer (AdamW with weight decay, the distillation target's frozen params), 10 steps.
    tx, schedule, _ = distill.make_optimizer(c, ts.split_model(student)[1], total_steps=10, warmup_steps=0)
    batch = {"teacher": x_t, "student": x_s}
    rng = jax.random.PRNGKey(0)
    rec = exact.grad_recorder()
    graphdef, tgraph, state = ts.init_state(student, rec, teachers={"teacher": teacher})
    one_teacher = {"teacher": distill.TeacherSpec(block=spec.teacher_block)}
    run = exact.step_runner(distill.make_distill_step(graphdef, tgraph, rec, schedule, spec, one_teacher), state, devices=2)
    new, step_metrics = run(state, batch, rng)
    grads = torch_named(graphdef, new["opt"], state["consts"])

    # One step of the trainer's optimizer.
    params = state["params"]
    frozen = distill.distill_frozen_patterns(spec, params)
    _, _, state = ts.init_state(student, tx, teachers={"teacher": teacher})
    run = exact.step_runner(distill.make_distill_step(graphdef, tgraph, tx, schedule, spec, one_teacher), state, devices=2)
    after, adamw_metrics = run(state, batch, rng)
    frozen_flags = jax.tree_util.tree_map_with_path(
        lambda p, x: np.full(x.shape, float(optim.match(frozen, optim.path_name(p)))), params)
    out = dict(
        dtypes=dtypes, notes=[n for r in reports for n in r.notes], grads=grads,
        grad_dtypes={str(x.dtype) for x in jax.tree.leaves(new["opt"])},
        maps={k: np.asarray(v) for k, v in maps.items()},
        losses={k: float(v) for k, v in parts.items()},
        step_metrics=jax.device_get(step_metrics), adamw_metrics=jax.device_get(adamw_metrics),
        adamw_dtypes={str(x.dtype) for x in jax.tree.leaves((after["params"], after["opt"]))
                      if jnp.issubdtype(x.dtype, jnp.floating)},
        trainable=set(torch_named(graphdef, params, state["consts"])) - {"pos_embed"},
        before=torch_named(graphdef, jax.device_get(state["params"]), state["consts"]),
        after=torch_named(graphdef, after["params"], after["consts"]),
        built_table=built_table,
        pos_embed=(np.asarray(state["consts"]["pos_embed"]), np.asarray(after["consts"]["pos_embed"])),
        frozen_names={n for n, v in torch_named(graphdef, frozen_flags, state["consts"]).items()
                      if n != "pos_embed" and v.all()})
  assert not jax.config.jax_enable_x64  # scoped: nothing leaks into other tests
  return out


def test_whole_path_is_float64(ours):
  assert ours["dtypes"] == {"float64"}
  assert ours["grad_dtypes"] == {"float64"}
  assert ours["notes"] == []  # nothing rounded on loading, no fixed table replaced by other values


@pytest.mark.parametrize("name", MAPS)
def test_relation_maps(ours, ref, name):
  assert ours["maps"][name].shape == tuple(ref["meta"]["relation_shape"])
  np.testing.assert_allclose(ours["maps"][name], ref[name], rtol=0, atol=1e-12)


def test_losses(ours, ref):
  for name in ("loss_qk", "loss_vv"):
    for got in (ours["losses"][name], float(ours["step_metrics"][name])):  # losses.relation_loss, the step's
      assert abs(got - float(ref[name])) <= 1e-12, (name, got - float(ref[name]))
  got = float(ours["step_metrics"]["loss"]) - float(ref["loss_qk"] + ref["loss_vv"])
  assert abs(got) <= 1e-12, got


def test_gradients(ours, ref):
  stored = {k[len("grad/"):] for k in ref if k.startswith("grad/")}
  none = set(ref["grad_none"])
  assert stored == ours["trainable"] - none and len(stored) == 139
  errors = {}
  for name in stored:
    want, got = ref["grad/" + name], ours["grads"][name]
    assert got.shape == want.shape, name
    errors[name] = np.linalg.norm(got - want) / np.linalg.norm(want)
  worst = max(errors, key=errors.get)
  assert errors[worst] <= 1e-10, (worst, errors[worst])


def test_no_gradient_where_the_reference_has_none(ours, ref):
  none = set(ref["grad_none"])
  # pos_embed is a fixed table, not a parameter: it has no gradient at all.
  assert "pos_embed" in none and "pos_embed" not in ours["trainable"]
  for name in none - {"pos_embed"}:
    assert ours["grads"][name].dtype == np.float64 and not np.any(ours["grads"][name]), name
  # The trainer's frozen rules (distill.distill_frozen_patterns) name exactly these parameters.
  assert ours["frozen_names"] == none - {"pos_embed"}


def test_optimizer_step_leaves_them_untouched(ours, ref):
  before, after = ours["before"], ours["after"]
  assert ours["adamw_metrics"]["nonfinite"] == 0 and float(ours["adamw_metrics"]["lr"]) > 0
  assert ours["adamw_dtypes"] == {"float64"}  # params and Adam moments
  none = set(ref["grad_none"]) - {"pos_embed"}
  for name in none:
    np.testing.assert_array_equal(after[name], before[name], err_msg=name)  # weight decay included
  for name in ours["trainable"] - none:
    assert not np.array_equal(after[name], before[name]), name
  np.testing.assert_array_equal(*ours["pos_embed"])


def test_fixed_table_is_the_float32_rounded_one(ours, ref):
  # The reference's sin-cos table is a float32 buffer before `.double()`; a float64 model builds the same.
  assert ours["built_table"].dtype == np.float64
  np.testing.assert_array_equal(ours["built_table"], ref["stu/pos_embed"])
