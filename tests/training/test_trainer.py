"""The trainer end to end on the embedded data: exact resume after SIGTERM or a crash,
8 devices equal 1, evaluation and prediction launchers, clear errors.

Training runs here use the `smoke` U-Net config (widths 4..8) on the tiny builder config
of the digit canvases, prepared once per session into a temporary TFDS data dir.
"""

import json
import os
import signal
import subprocess
import sys
import time

import flax
import jax
import numpy as np
import pytest

from experiments.configs import unet as unet_config
from zoo import training
from zoo.training import trainer as trainer_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATASET = "digit_canvases/tiny"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def overrides(data_dir, **extra):
  """The --config.* overrides shared by in-process and subprocess runs."""
  values = {"data.name": DATASET, "data.data_dir": data_dir, "mesh.num_devices": 1,
            "total_steps": 12, "checkpoint_every": 4, "eval_every": 0}
  values.update(extra)
  return values


def make_config(values):
  config = unet_config.get_config("smoke")
  for path, value in values.items():
    node = config
    *parents, leaf = path.split(".")
    for name in parents:
      node = node[name]
    node[leaf] = value
  return config


def launch(module, workdir, values, **popen_kwargs):
  command = [sys.executable, "-m", module, "--config=experiments/configs/unet.py:smoke",
             f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in values.items()]
  return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, **popen_kwargs)


def final_params(workdir, config):
  return jax.device_get(training.Experiment(config).restore(workdir).params)


def assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
  """A complete in-process run: (workdir, config, results)."""
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  config = make_config(overrides(data_dir))
  results = training.train_and_evaluate(config, workdir)
  return workdir, config, results


def test_init_from_copies_matching_parameters(uninterrupted, data_dir):
  """Fine-tuning: a run with `init_from` starts from another run's parameters where names and
  shapes agree; a changed layer (here the classifier, 5 classes instead of 11) keeps its init."""
  workdir, config, _ = uninterrupted
  source = final_params(workdir, config)
  changed = make_config(overrides(data_dir, **{"model.num_classes": 5, "task.num_classes": 5}))
  experiment = training.Experiment(changed)
  fresh = experiment.init_state()
  state = trainer_lib.initialized_from(fresh, workdir)
  assert int(state.step) == 0
  flat_source = flax.traverse_util.flatten_dict(source)
  flat_fresh = flax.traverse_util.flatten_dict(jax.device_get(fresh.params))
  same = different = 0
  for path, value in flax.traverse_util.flatten_dict(jax.device_get(state.params)).items():
    if flat_source[path].shape == value.shape:
      np.testing.assert_array_equal(value, flat_source[path])
      same += 1
    else:
      np.testing.assert_array_equal(value, flat_fresh[path])
      different += 1
  assert same > 10 and different >= 1
  with pytest.raises(ValueError, match="not a workdir with checkpoints"):
    trainer_lib.initialized_from(fresh, data_dir)


def test_uninterrupted_run_writes_results_and_keeps_k_checkpoints(uninterrupted):
  workdir, config, results = uninterrupted
  assert results["step"] == config.total_steps
  with open(os.path.join(workdir, "results.json")) as f:
    written = json.load(f)
  for split in config.final_eval_splits:
    assert 0.0 <= written[split]["miou"] <= 1.0
    assert written[split]["miou"] == pytest.approx(results[split]["miou"])
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert steps == [4, 8, 12][-config.keep_checkpoints:]
  assert os.listdir(os.path.join(workdir, "tensorboard", "train"))


def test_sigterm_checkpoints_and_resume_matches_uninterrupted(uninterrupted, data_dir, tmp_path):
  reference_dir, config, _ = uninterrupted
  workdir = str(tmp_path / "preempted")
  process = launch("experiments.train", workdir, overrides(data_dir))
  # The handler is installed before this line is logged; the signal lands before step 1 ends.
  for line in process.stderr:
    if "Starting from scratch" in line:
      break
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=300)
  assert process.returncode == 143, stderr[-3000:]
  assert "Stopped at step 1 after SIGTERM" in stderr
  # Step 1 is not a periodic checkpoint step (every 4): it was written because of the signal.
  assert training.Experiment(config).checkpointer(workdir, read_only=True).latest_step() == 1

  resumed = training.train_and_evaluate(config, workdir)
  assert resumed["step"] == config.total_steps
  assert_trees_equal(final_params(workdir, config), final_params(reference_dir, config))


def test_crash_resumes_from_last_complete_checkpoint(uninterrupted, data_dir, tmp_path):
  reference_dir, config, _ = uninterrupted
  workdir = tmp_path / "crashed"
  process = launch("experiments.train", str(workdir), overrides(data_dir))
  deadline = time.time() + 300
  while not (workdir / "checkpoints" / "4").exists() and process.poll() is None:
    assert time.time() < deadline, "no checkpoint appeared"
    time.sleep(0.02)
  process.kill()  # SIGKILL: no chance to save; a later checkpoint may be half-written.
  process.communicate()
  training.train_and_evaluate(config, str(workdir))
  assert_trees_equal(final_params(str(workdir), config), final_params(reference_dir, config))


def test_eight_devices_match_one(data_dir):
  assert jax.device_count() == 8, "tests/conftest.py should give 8 virtual CPU devices"
  results = {}
  for num_devices in (1, 8):
    experiment = training.Experiment(make_config(overrides(data_dir, **{"mesh.num_devices": num_devices})))
    state = experiment.init_state()
    iterator = experiment.train_iterator()
    losses = []
    for _ in range(3):
      state, metrics = experiment.train_step(state, next(iterator))
      losses.append(float(metrics["loss"]))
    leaf = jax.tree.leaves(state.params)[0]
    assert len(leaf.sharding.device_set) == num_devices
    results[num_devices] = (losses, jax.device_get(state.params), jax.device_get(state.model_state))
  np.testing.assert_allclose(results[8][0], results[1][0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               results[8][1], results[1][1])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               results[8][2], results[1][2])


def test_batch_is_split_over_the_data_axis(data_dir):
  experiment = training.Experiment(make_config(overrides(data_dir, **{"mesh.num_devices": 8})))
  batch = training.mesh.global_batch(next(experiment.train_iterator()), experiment.mesh)
  image = batch["image"]
  assert len(image.sharding.device_set) == 8
  assert {shard.data.shape[0] for shard in image.addressable_shards} == {image.shape[0] // 8}


def test_eval_and_predict_launchers(uninterrupted, tmp_path):
  workdir, config, results = uninterrupted
  evaluation = subprocess.run([sys.executable, "-m", "experiments.eval", f"--workdir={workdir}",
                               "--split=test"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert evaluation.returncode == 0, evaluation.stderr[-3000:]
  reported = json.loads(evaluation.stdout[evaluation.stdout.index("{"):])
  assert reported["step"] == config.total_steps
  assert reported["miou"] == pytest.approx(results["test"]["miou"], abs=1e-9)

  output_dir = tmp_path / "pictures"
  prediction = subprocess.run([sys.executable, "-m", "experiments.predict", f"--workdir={workdir}",
                               "--num_images=3", f"--output_dir={output_dir}"],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
  assert prediction.returncode == 0, prediction.stderr[-3000:]
  from PIL import Image
  files = sorted(os.listdir(output_dir))
  assert files == ["test_0000.png", "test_0001.png", "test_0002.png"]
  picture = np.asarray(Image.open(output_dir / files[0]))
  height, width = picture.shape[:2]
  assert picture.shape[2] == 3 and width > 3 * height - 1  # Three panels side by side.


@pytest.mark.parametrize("values,message", [
    ({"model.name": "unet3d"}, "Unknown model 'unet3d'"),
    ({"model.padding": "VALID", "model.depth": 3}, "VALID"),
    ({"task.name": "depth"}, "Unknown task.name"),
    ({"optimizer.name": "adagrad"}, "Unknown optimizer.name"),
    ({"batch_size": 12, "mesh.num_devices": 8}, "multiple of the 8 devices"),
    ({"mesh.num_devices": 9}, "sees 8"),
])
def test_bad_config_is_named(data_dir, tmp_path, values, message):
  with pytest.raises(ValueError, match=message):
    training.train_and_evaluate(make_config(overrides(data_dir, **values)), str(tmp_path))


def test_unwritable_workdir_is_named(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(ValueError, match="not a writable directory"):
    training.prepare_workdir(str(blocker / "run"))


@pytest.mark.parametrize("arguments,message", [
    (["--config.model.name=unet3d"], "error: Unknown model 'unet3d'"),
    (["--config.model.widths=3"], "error: a --config.* override names a field the config does not have"),
])
def test_launcher_prints_one_clean_line(data_dir, tmp_path, arguments, message):
  result = subprocess.run(
      [sys.executable, "-m", "experiments.train", "--config=experiments/configs/unet.py:smoke",
       f"--workdir={tmp_path}", f"--config.data.data_dir={data_dir}",
       f"--config.data.name={DATASET}"] + arguments,
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert message in result.stderr
  assert "Traceback" not in result.stderr
