"""The trainer end to end on the embedded data: exact resume after SIGTERM or a crash,
8 devices equal 1, evaluation and prediction launchers (relative workdirs), clear errors: labels
outside the classes, a diverging run, unknown config fields, resuming with another config.

Training runs here use the `smoke` U-Net config (widths 4..8) on the tiny builder config
of the digit canvases, prepared once per session into a temporary TFDS data dir.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import flax
import jax
import ml_collections
import numpy as np
import pytest

from experiments.configs import unet as unet_config
from zoo import training
from zoo.training import run_config, summaries
from zoo.training import trainer as trainer_lib
from tests.training import logged

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
  assert len(logged.training_losses(workdir)) == config.total_steps // config.log_every
  logged.assert_loss_finite_and_falling(workdir)
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


def test_resuming_with_another_config_lists_the_changes(uninterrupted, tmp_path):
  reference_dir, config, _ = uninterrupted
  workdir = str(tmp_path / "resumed")
  shutil.copytree(reference_dir, workdir)
  changed = make_config({**overrides(config.data.data_dir), "total_steps": 14,
                         "optimizer.learning_rate": 1e-3, "log_every": 1})
  with pytest.raises(ValueError, match=r"differs from this one in optimizer.learning_rate: "
                     r"0.003 -> 0.001; total_steps: 12 -> 14\. .*--allow_config_change"):
    training.train_and_evaluate(changed, workdir)
  assert training.read_config(workdir).to_dict() == run_config.as_json(config)

  results = training.train_and_evaluate(changed, workdir, allow_config_change=True)
  assert results["step"] == 14
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  assert saved["config_changes"] == [{"step": 12, "changed": {
      "optimizer.learning_rate": {"before": 0.003, "after": 0.001},
      "total_steps": {"before": 12, "after": 14}}}]  # log_every changes nothing trained.
  assert training.read_config(workdir).to_dict() == run_config.as_json(changed)


def test_labels_outside_the_classes_stop_before_the_first_step(data_dir, tmp_path):
  config = make_config(overrides(data_dir, **{"model.num_classes": 5}))
  assert config.task.num_classes == 5  # One value for the model and the task.
  with pytest.raises(ValueError, match=r"labels \(ignore label 255 aside\) range over \[0, \d+\], "
                     r"but num_classes=5 .*--config.model.num_classes"):
    training.train_and_evaluate(config, str(tmp_path))
  assert not os.listdir(tmp_path / "checkpoints")


def test_model_and_task_class_counts_must_agree(data_dir, tmp_path):
  config = make_config(overrides(data_dir))
  config.model = ml_collections.ConfigDict({**config.model.to_dict(), "num_classes": 12})
  assert config.task.num_classes == 11  # A new model section drops the tie.
  with pytest.raises(ValueError, match="The model outputs 12 classes but task.num_classes=11"):
    training.train_and_evaluate(config, str(tmp_path))


def test_divergence_stops_the_run_and_keeps_the_last_finite_checkpoint(data_dir, tmp_path):
  """lr 1e30: step 1 has learning rate 0 (warm-up), step 2 moves the parameters by ~1e29, and
  the loss of step 3 is not finite; the checkpoint of step 2 is the last one."""
  config = make_config(overrides(data_dir, **{"optimizer.learning_rate": 1e30,
                                              "checkpoint_every": 2, "log_every": 4}))
  with pytest.raises(training.Diverged, match=r"at step 3: loss=nan.*newest checkpoint, step 2"):
    training.train_and_evaluate(config, str(tmp_path))
  experiment = training.Experiment(config)
  checkpointer = experiment.checkpointer(str(tmp_path), read_only=True)
  assert checkpointer.all_steps() == [2]
  checkpointer.close()
  state = jax.device_get(experiment.restore(str(tmp_path)))
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves((state.params, state.model_state)))
  assert "loss" not in summaries.read_scalars(str(tmp_path))  # Its interval was not logged.


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
  """Both with a relative --workdir, as the README shows them."""
  workdir, config, results = uninterrupted
  parent, name = os.path.split(workdir)
  evaluation = subprocess.run([sys.executable, "-m", "experiments.eval", f"--workdir={name}",
                               "--split=test"], cwd=parent, capture_output=True, text=True,
                              timeout=300)
  assert evaluation.returncode == 0, evaluation.stderr[-3000:]
  reported = json.loads(evaluation.stdout[evaluation.stdout.index("{"):])
  assert reported["step"] == config.total_steps
  assert reported["miou"] == pytest.approx(results["test"]["miou"], abs=1e-9)

  output_dir = tmp_path / "pictures"
  prediction = subprocess.run([sys.executable, "-m", "experiments.predict", f"--workdir={name}",
                               "--num_images=3", f"--output_dir={output_dir}"],
                              cwd=parent, capture_output=True, text=True, timeout=300)
  assert prediction.returncode == 0, prediction.stderr[-3000:]
  for quiet in (evaluation.stderr, prediction.stderr):  # Library notices dropped by the launcher.
    assert "read only" not in quiet and "Unable to initialize backend" not in quiet
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
    ({"optimizer.warmup_step": 5}, r"config.optimizer.warmup_step is not a field the trainer "
     r"reads; config.optimizer takes: name, learning_rate, schedule, warmup_steps"),
    ({"data.max_object": 4}, r"config.data.max_object is not a field .* max_objects"),
    ({"mesh.devices": 1}, r"config.mesh.devices is not a field .* num_devices, model_axis_size"),
    ({"total_step": 4}, r"config.total_step is not a field .* total_steps"),
    ({"task.num_class": 4}, r"task.num_class is not a field of task 'semantic_segmentation'; "
     r"it takes: num_classes, ignore_label, key"),
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
    (["--config.optimizer.learning_rate=1e30"], "error: Training diverged at step 3: loss=nan"),
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


def test_missing_config_file_is_one_line_before_anything_starts(tmp_path):
  workdir = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "-m", "experiments.train", "--config=experiments/configs/unet_typo.py:smoke",
       f"--workdir={workdir}"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert result.stderr.startswith("error: --config=experiments/configs/unet_typo.py:smoke: there "
                                  "is no file experiments/configs/unet_typo.py"), result.stderr
  assert "JAX" not in result.stderr and not workdir.exists()
