"""The pixel floors: the frozen-feature evals on the normalised pixels, re-derived from the idx files."""
import numpy as np
import pytest

from tests.helpers import fake_fmnist
from tinymim_jax import config_base, floors, knn


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("fmnist"))
  arrays = fake_fmnist.make(root, n_train=120, n_test=40)
  c = config_base.base_config()
  c.data.name, c.data.idx_dir, c.data.image_size, c.data.crop_pct = "fashion_mnist", root, 28, 1.0
  c.data.student_norm = c.data.teacher_norm = ((0.3,) * 3, (0.4,) * 3)
  c.batch_size = 32
  c.eval.max_train = 100
  c.eval.fewshot.shots, c.eval.fewshot.val_per_class = (1, 2), 4
  c.linprobe.epochs, c.linprobe.batch_size = 2.0, 32
  return c, arrays


def test_pixel_arrays_are_the_normalised_files(setup):
  c, arrays = setup
  x, y = floors.pixel_arrays(c, "test")
  expected = (arrays["test"][0].reshape(40, -1) / 255.0 - 0.3) / 0.4  # one channel of three equal ones
  np.testing.assert_allclose(x, expected, atol=1e-5)
  np.testing.assert_array_equal(y, arrays["test"][1])


def test_pixel_floors_use_the_eval_protocol(setup):
  c, arrays = setup
  res = floors.pixel_floors(c)
  assert set(res) == {"eval/knn_top1", "eval/fewshot_1shot_top1", "eval/fewshot_2shot_top1", "eval/linprobe_top1",
                      "eval/linprobe_top5", "eval/logreg_top1"}
  norm = lambda a: (a.reshape(len(a), -1) / 255.0 - 0.3) / 0.4
  (xt, yt), (xs, ys) = arrays["train"], arrays["test"]
  # k-NN over the first eval.max_train train images, as the eval objective reads them.
  assert res["eval/knn_top1"] == knn.knn_top1(norm(xt)[:100], yt[:100], norm(xs), ys, k=20, temperature=0.07,
                                              num_classes=10)
  from sklearn.linear_model import LogisticRegression
  from sklearn.preprocessing import StandardScaler
  s = StandardScaler().fit(norm(xt))
  lr = LogisticRegression(max_iter=1000).fit(s.transform(norm(xt)), yt)
  assert res["eval/logreg_top1"] == pytest.approx(float((lr.predict(s.transform(norm(xs))) == ys).mean()))
  assert res["eval/logreg_top1"] > 0.5  # the fake classes are bars at different rows: linearly separable


def test_run_writes_done_and_reruns_read_it(setup, tmp_path):
  c, _ = setup
  first = floors.run(c, str(tmp_path / "floors"))
  assert (tmp_path / "floors" / "done.json").exists() and first["step"] == 0
  assert floors.run(c, str(tmp_path / "floors")) == {**first}
